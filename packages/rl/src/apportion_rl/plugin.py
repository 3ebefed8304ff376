"""Entry point of apportion-rl: registers its components by import path (nothing heavy here)."""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"

_P = "apportion_rl"


@hookimpl
def apportion_register_trainer_strategies(register):
    register(
        "grpo",
        f"{_P}.grpo:GRPO",
        config=f"{_P}.grpo:GRPOConfig",
        replace=True,
        summary="GRPO: group-normalised advantages, clipped token loss; counts bad rewards",
    )
    register(
        "dr-grpo",
        f"{_P}.dr_grpo:DrGRPO",
        config=f"{_P}.dr_grpo:DrGRPOConfig",
        summary="Dr.GRPO: advantage r - mean, loss over a constant token count",
    )
    register(
        "dapo",
        f"{_P}.dapo:DAPO",
        config=f"{_P}.dapo:DAPOConfig",
        summary="DAPO: clip-higher, dynamic sampling of equal-reward groups, token-level loss",
    )
    register(
        "gspo",
        f"{_P}.gspo:GSPO",
        config=f"{_P}.gspo:GSPOConfig",
        summary="GSPO: sequence-level importance ratio, clipped per sequence",
    )
    register(
        "xrpo",
        f"{_P}.xrpo:XRPO",
        config=f"{_P}.xrpo:XRPOConfig",
        summary="XRPO: Student-t uncertainty rollout allocator, ICL seeding, novelty sharpening",
    )
    register(
        "supo",
        f"{_P}.supo:SUPO",
        config=f"{_P}.supo:SUPOConfig",
        summary="SUPO: summarise near the context limit, split trajectories, mask overlong",
    )
