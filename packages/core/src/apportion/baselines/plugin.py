"""Registers the core baselines, so that the core runs alone. Import paths are strings:
nothing heavy is imported here."""

from apportion import hookimpl


@hookimpl
def apportion_register_attention(register):
    register("apportion.host.attention:AttentionBackend", name="dense")


@hookimpl
def apportion_register_kv_policies(register):
    register("apportion.host.kv:KVPolicy", name="full")


@hookimpl
def apportion_register_allocators(register):
    register("apportion.baselines.pageable:Pageable", name="pageable")


@hookimpl
def apportion_register_trainer_strategies(register):
    register("apportion.baselines.grpo:GRPO", name="grpo")


@hookimpl
def apportion_register_prompt_strategies(register):
    register("apportion.base:PromptStrategy", name="zero-shot")


@hookimpl
def apportion_register_benchmarks(register):
    register("apportion.baselines.niah:SingleNeedle", name="niah")
