"""Plugin isolation, allow/deny lists, strict mode and the API check, through real entry points."""

GOOD = """
from apportion import hookimpl
APPORTION_API = ">=2.0,<3"

@hookimpl
def apportion_register_kv_policies(register):
    register("policies:GoodPolicy", name="goodpolicy")
"""

#: the components the test plugins register by import path
POLICIES = """
from apportion.host.kv import KVPolicy

class GoodPolicy(KVPolicy):
    name = "goodpolicy"
    summary = "a fine policy"

class OtherPolicy(KVPolicy):
    name = "otherpolicy"
    summary = "another fine policy"

class Full(KVPolicy):
    summary = "mine"

class Misnamed(KVPolicy):
    name = "not-what-it-says"
    summary = "registered under another name"
"""


def test_good_plugin_is_discovered(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add("goodplug", GOOD)
    report = plugin_dir.report()
    assert report["goodplug"]["error"] is None
    assert report["goodplug"]["components"] == {"kv-policy": ["goodpolicy"]}
    assert report["goodplug"]["version"] == "0.1.0"


def test_import_error_is_reported_and_skipped(plugin_dir):
    plugin_dir.module("policies", POLICIES)
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
    register("x:y", name="half")
    raise RuntimeError("boom in hook")
""",
    )
    report = plugin_dir.report()
    assert "boom in hook" in report["raiseplug"]["error"]
    assert report["raiseplug"]["components"] == {}


def test_duplicate_names_the_two_providers(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add("goodplug", GOOD)
    plugin_dir.add("twinplug", GOOD)
    report = plugin_dir.report()
    # the clash falls on the plugin that came second (entry-point name order), for that
    # name only; neither plugin is disabled
    assert report["goodplug"]["error"] is None and report["goodplug"]["clashes"] == []
    assert report["goodplug"]["components"] == {"kv-policy": ["goodpolicy"]}
    clash = report["twinplug"]["clashes"][0]
    assert "goodplug" in clash and "twinplug" in clash and "goodpolicy" in clash
    assert report["twinplug"]["error"] is None


def test_an_impostor_never_disables_the_family_it_copies(plugin_dir):
    """A plugin that registers a name another plugin owns loses that name only, whichever
    loads first; the other plugin keeps every component."""
    plugin_dir.module("policies", POLICIES)
    family = """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("policies:GoodPolicy", name="goodpolicy")
    register("policies:OtherPolicy", name="otherpolicy")
"""
    plugin_dir.add("zfamily", family)
    plugin_dir.add("aimpostor", GOOD)  # sorts first: it keeps goodpolicy
    report = plugin_dir.report()
    assert report["aimpostor"]["components"] == {"kv-policy": ["goodpolicy"]}
    assert report["zfamily"]["components"] == {"kv-policy": ["otherpolicy"]}
    assert report["zfamily"]["error"] is None and len(report["zfamily"]["clashes"]) == 1
    rc, _, err = plugin_dir.run(
        "from apportion import get_registry; get_registry()", APPORTION_STRICT_PLUGINS="1"
    )
    assert rc != 0 and "goodpolicy" in err  # CI still fails on a clash


def test_registered_name_must_match_the_class(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add(
        "misplug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("policies:Misnamed", name="misnamed")
""",
    )
    assert plugin_dir.report()["misplug"]["components"] == {"kv-policy": ["misnamed"]}
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry\n"
        "try:\n    get_registry().create('kv-policy', 'misnamed')\n"
        "except Exception as e:\n    print(type(e).__name__, e)"
    )
    assert rc == 0, err
    assert "PluginError" in out and "not-what-it-says" in out and "one name" in out


def test_a_lazy_path_needs_a_name(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add(
        "nonameplug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("policies:GoodPolicy")
""",
    )
    assert "needs name=" in plugin_dir.report()["nonameplug"]["error"]


def test_duplicate_of_core_baseline_is_an_error_without_replace(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add(
        "fullplug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("policies:Full", name="full")
""",
    )
    assert "apportion-core" in plugin_dir.report()["fullplug"]["clashes"][0]


def test_replace_core_baseline(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add(
        "replug",
        """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("policies:Full", name="full", replace=True)
""",
    )
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry; s = get_registry().get('kv-policy', 'full');"
        "print(s.provider, s.replaces)"
    )
    assert rc == 0, err
    assert out.split()[0] == "replug" and "apportion-core" in out


def test_incompatible_api_names_both_versions(plugin_dir):
    plugin_dir.add("futureplug", GOOD.replace(">=2.0,<3", ">=3.0"))
    err = plugin_dir.report()["futureplug"]["error"]
    assert ">=3.0" in err and "provides API 2.0" in err


def test_allow_and_deny_lists(plugin_dir):
    plugin_dir.module("policies", POLICIES)
    plugin_dir.add("goodplug", GOOD)
    plugin_dir.add(
        "otherplug", GOOD.replace("goodpolicy", "otherpolicy").replace("GoodPolicy", "OtherPolicy")
    )
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


def test_unknown_name_points_at_the_plugin_that_failed_to_load(plugin_dir):
    """The error names the broken provider, and still says which package provides the kind
    when that family is not installed."""
    plugin_dir.add("brokenplug", "raise ImportError('nope')\n")
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry\n"
        "try:\n    get_registry().get('kv-policy', 'snapkv')\n"
        "except Exception as e:\n    print(type(e).__name__, e)",
        APPORTION_PLUGINS="brokenplug",  # apportion-kvcache not loaded: as if not installed
    )
    assert rc == 0, err
    assert out.startswith("UnknownComponentError unknown kv-policy 'snapkv'")
    assert "brokenplug (brokenplug 0.1.0): ImportError: nope" in out
    assert "pip install apportion-kvcache" in out


def test_an_installed_family_that_failed_is_named_not_offered_for_install(plugin_dir):
    """When the family that provides a kind is the plugin that failed, the error names it and
    its failure; telling the user to install it would be wrong."""
    (plugin_dir.path / "fakekv.py").write_text("raise ImportError('broken install')\n")
    info = plugin_dir.path / "apportion_kvcache-9.9.9.dist-info"  # shadows the real one
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: apportion-kvcache\nVersion: 9.9.9\n"
    )
    (info / "entry_points.txt").write_text("[apportion]\nfakekv = fakekv\n")
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry\n"
        "try:\n    get_registry().get('kv-policy', 'snapkv')\n"
        "except Exception as e:\n    print(type(e).__name__, e)",
        APPORTION_PLUGINS="fakekv",
    )
    assert rc == 0, err
    assert "fakekv (apportion-kvcache 9.9.9): ImportError: broken install" in out
    assert "pip install" not in out


def test_unknown_name_of_an_uninstalled_family_says_what_to_install(plugin_dir):
    rc, out, err = plugin_dir.run(
        "from apportion import get_registry\n"
        "try:\n    get_registry().get('benchmark', 'holobench')\n"
        "except Exception as e:\n    print(e)",
        APPORTION_PLUGINS="",
    )
    assert rc == 0, err
    assert "pip install apportion-eval" in out
