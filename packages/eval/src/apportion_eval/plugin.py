"""Entry point of apportion-eval: registers its benchmarks by import path (nothing heavy is
imported here), renders a run's report, and adds ``apportion report``."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"


@hookimpl
def apportion_register_benchmarks(register):
    register("apportion_eval.niah:Niah", name="niah", replace=True)
    register("apportion_eval.variable_tracking:VariableTracking", name="variable-tracking")
    register("apportion_eval.needle_threading:NeedleThreading", name="needle-threading")
    register("apportion_eval.holobench:HoloBench", name="holobench")
    register("apportion_eval.longgen:LongGen", name="longgen")
    register("apportion_eval.context_awareness:ContextAwareness", name="context-awareness")
    register("apportion_eval.cwe:Cwe", name="cwe")
    register("apportion_eval.fwe:Fwe", name="fwe")
    register("apportion_eval.multihop_qa:MultiHopQA", name="multihop-qa")
    register("apportion_eval.graph_tracing:GraphTracing", name="graph-tracing")


@hookimpl
def apportion_report(run, console):
    from apportion_eval.report import render_run

    return render_run(run, console)


@hookimpl
def apportion_default_config():
    from importlib.resources import files

    return str(files("apportion_eval").joinpath("default.toml"))


@hookimpl
def apportion_register_commands(app):
    from apportion_eval.cli import register_commands

    register_commands(app)
