"""Registers the core baselines. Import paths are strings: nothing heavy is imported here."""

from apportion import hookimpl


@hookimpl
def apportion_register_attention(register):
    register(
        "dense",
        "apportion.host.attention:AttentionBackend",
        summary="transformers' SDPA attention over every key (the reference)",
    )


@hookimpl
def apportion_register_kv_policies(register):
    register("full", "apportion.host.kv:KVPolicy", summary="keep every KV entry (no compression)")


@hookimpl
def apportion_register_allocators(register):
    register(
        "pageable",
        "apportion.baselines.pageable:Pageable",
        config="apportion.baselines.pageable:PageableConfig",
        summary="ordinary pageable host memory, with byte accounting",
    )


@hookimpl
def apportion_register_trainer_strategies(register):
    register(
        "grpo",
        "apportion.baselines.grpo:GRPO",
        config="apportion.baselines.grpo:GRPOConfig",
        summary="GRPO: uniform rollouts, group-normalised advantages, clipped loss",
    )


@hookimpl
def apportion_register_prompt_strategies(register):
    register(
        "zero-shot",
        "apportion.base:PromptStrategy",
        summary="the context, then the question; no demonstrations",
    )


@hookimpl
def apportion_register_benchmarks(register):
    register(
        "niah",
        "apportion.baselines.niah:SingleNeedle",
        config="apportion.baselines.niah:NeedleConfig",
        summary="single needle in a haystack (7-digit number) at given lengths and depths",
    )
