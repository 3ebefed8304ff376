"""Plugin isolation, allow/deny lists, strict mode and the API check, through real entry points."""

GOOD = """
from apportion import hookimpl
APPORTION_API = ">=1.0,<2"

@hookimpl
def apportion_register_kv_policies(register):
    register("goodpolicy", "apportion.host.kv:KVPolicy", summary="a fine policy")
"""


def test_good_plugin_is_discovered(plugin_dir):
    plugin_dir.add("goodplug", GOOD)
    report = plugin_dir.report()
    assert report["goodplug"]["error"] is None
    assert report["goodplug"]["components"] == {"kv-policy": ["goodpolicy"]}
    assert report["goodplug"]["version"] == "0.1.0"


def test_import_error_is_reported_and_skipped(plugin_dir):
    plugin_dir.add("goodplug", GOOD)
    plugin_dir.add("brokenplug", "import no_such_module_xyz\n")
    report = plugin_dir.report()
    assert "ModuleNotFoundError" in report["brokenplug"]["error"]
    assert report["goodplug"]["error"] is None  # others still load


def test_hook_that_raises_is_reported(plugin_dir):
    plugin_dir.add(
        "raiseplug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_benchmarks(register):
    register("half", "x:y", summary="s")
    raise RuntimeError("boom in hook")
""",
    )
    report = plugin_dir.report()
    assert "boom in hook" in report["raiseplug"]["error"]
    assert report["raiseplug"]["components"] == {}


def test_duplicate_names_the_two_providers(plugin_dir):
    plugin_dir.add("goodplug", GOOD)
    plugin_dir.add("twinplug", GOOD.replace("a fine policy", "a twin"))
    report = plugin_dir.report()
    err = report["twinplug"]["error"] or report["goodplug"]["error"]
    assert "registered twice" in err and "goodplug" in err and "twinplug" in err


def test_duplicate_of_core_baseline_is_an_error_without_replace(plugin_dir):
    plugin_dir.add(
        "fullplug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("full", "apportion.host.kv:KVPolicy", summary="mine")
""",
    )
    assert "apportion-core" in plugin_dir.report()["fullplug"]["error"]


def test_replace_core_baseline(plugin_dir):
    plugin_dir.add(
        "replug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("full", "apportion.host.kv:KVPolicy", summary="mine", replace=True)
""",
    )
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry; s = get_registry().get('kv-policy', 'full');"
        "print(s.provider, s.replaces)"
    )
    assert rc == 0, err
    assert out.split()[0] == "replug" and "apportion-core" in out


def test_incompatible_api_names_both_versions(plugin_dir):
    plugin_dir.add("futureplug", GOOD.replace(">=1.0,<2", ">=2.0"))
    err = plugin_dir.report()["futureplug"]["error"]
    assert ">=2.0" in err and "provides API 1.0" in err


def test_allow_and_deny_lists(plugin_dir):
    plugin_dir.add("goodplug", GOOD)
    plugin_dir.add("otherplug", GOOD.replace("goodpolicy", "otherpolicy"))
    only = plugin_dir.report(APPORTION_PLUGINS="otherplug")
    assert only["goodplug"]["skipped"] and only["otherplug"]["skipped"] is None
    none = plugin_dir.report(APPORTION_PLUGINS="")
    assert none["goodplug"]["skipped"] and none["otherplug"]["skipped"]
    assert none["core"]["components"]  # the baselines are always there
    deny = plugin_dir.report(APPORTION_DISABLE_PLUGINS="goodplug")
    assert deny["goodplug"]["skipped"] and deny["otherplug"]["skipped"] is None


def test_strict_mode_fails(plugin_dir):
    plugin_dir.add("brokenplug", "raise ImportError('nope')\n")
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry; get_registry()", APPORTION_STRICT_PLUGINS="1"
    )
    assert rc != 0 and "brokenplug" in err and "nope" in err


def test_cli_reports_broken_plugin(plugin_dir):
    plugin_dir.add("brokenplug", "raise ImportError('nope')\n")
    rc, out, err = plugin_dir.run(
        "import sys; sys.argv=['apportion','plugins']\nfrom apportion.cli import main\nmain()"
    )
    assert rc == 0 and "brokenplug" in out and "nope" in out
    rc, out, err = plugin_dir.run(
        "import sys; sys.argv=['apportion','plugins']\nfrom apportion.cli import main\nmain()",
        APPORTION_STRICT_PLUGINS="1",
    )
    assert rc == 2 and "nope" in err and "Traceback" not in err
