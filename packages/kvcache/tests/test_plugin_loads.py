"""apportion-kvcache is discovered through its entry point and loads cleanly."""

from apportion.plugins import PluginHost


def test_plugin_discovered_and_healthy():
    host = PluginHost()
    info = {p.name: p for p in host.plugins}["kvcache"]
    assert info.error is None, info.error
    assert info.distribution == "apportion-kvcache"
