"""Entry point of apportion-icl: registers its prompt strategies by import path (nothing heavy
is imported here) and the ``apportion icl`` commands."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"


@hookimpl
def apportion_register_prompt_strategies(register):
    register("apportion_icl.knn:KNN", name="knn")
    register("apportion_icl.latent:Latent", name="latent")
    register("apportion_icl.dynaicl:DynaICL", name="dynaicl")
    register("apportion_icl.adaptmi:AdaptMI", name="adaptmi")
    register("apportion_icl.adaptmi:AdaptMIPlus", name="adaptmi-plus")
    register("apportion_icl.recycle:Recycle", name="recycle")
    register("apportion_icl.prune:Prune", name="prune")
    register("apportion_icl.drag:DRAG", name="drag")
    register("apportion_icl.drag:IterDRAG", name="iterdrag")
    register("apportion_icl.verify:VerifyLoop", name="verify-loop")
    register("apportion_icl.structurize:Structurize", name="structurize")
    register("apportion_icl.compressor.strategy:ArcCompress", name="arc-compress")


@hookimpl
def apportion_register_commands(app):
    from apportion_icl.cli import app as icl  # typer only; commands import the heavy parts lazily

    app.add_typer(icl, name="icl")
