"""Entry point of apportion-rl: registers its trainer strategies by import path (nothing heavy
is imported here)."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"


@hookimpl
def apportion_register_trainer_strategies(register):
    register("apportion_rl.grpo:GRPO", name="grpo", replace=True)
    register("apportion_rl.dr_grpo:DrGRPO", name="dr-grpo")
    register("apportion_rl.dapo:DAPO", name="dapo")
    register("apportion_rl.gspo:GSPO", name="gspo")
    register("apportion_rl.xrpo:XRPO", name="xrpo")
    register("apportion_rl.supo:SUPO", name="supo")
