"""apportion-eval is discovered through its entry point and loads cleanly."""

from apportion.plugins import PluginHost


def test_plugin_discovered_and_healthy():
    host = PluginHost()
    info = {p.name: p for p in host.plugins}["eval"]
    assert info.error is None, info.error
    assert info.distribution == "apportion-eval"


def test_run_without_a_config_finds_the_shipped_default_study(tmp_path, monkeypatch):
    """Outside a checkout (no examples/default.toml), `apportion run` takes the study this
    package ships, through the core's ``apportion_default_config`` hook."""
    from apportion.cli import default_config_path
    from apportion.config import load_config

    monkeypatch.chdir(tmp_path)
    path = default_config_path()
    assert path is not None and path.name == "default.toml" and path.is_file()
    assert "apportion_eval" in str(path)
    assert load_config(path).benchmarks
