import pytest
from apportion.config import RunConfig, load_config, parse_config, resolve_config
from apportion.errors import ConfigError, DuplicateComponentError, UnknownComponentError
from apportion.host.kv import KVPolicy
from apportion.registry import ComponentSpec, Registry


def test_unknown_name_lists_known_and_suggests(registry):
    with pytest.raises(UnknownComponentError) as exc:
        registry.get("kv-policy", "ful")
    msg = str(exc.value)
    assert "Did you mean 'full'?" in msg and "Known: full" in msg


def test_unknown_kind(registry):
    with pytest.raises(UnknownComponentError, match="Did you mean 'kv-policy'"):
        registry.names("kv-policies")


def test_duplicate_in_registry():
    reg = Registry()
    reg.add(ComponentSpec("benchmark", "x", "a:b", provider="one", version="1"))
    with pytest.raises(DuplicateComponentError, match="one 1.*two 2.*skipped"):
        reg.add(ComponentSpec("benchmark", "x", "a:b", provider="two", version="2"))


def test_every_component_constructible_by_name(registry):
    for kind in registry.kinds():
        for spec in registry.specs(kind):
            assert spec.create() is not None, (kind, spec.name)


def test_malformed_config_points_at_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[model]\nname = "smollm2"\ndtype = "float64"\n[generation]\nmax_new_tokens = -3\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    locs = [loc for loc, _ in exc.value.errors]
    assert "model.dtype" in locs and "generation.max_new_tokens" in locs


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_component_options_validated_by_field(registry):
    cfg = parse_config(
        {"benchmarks": [{"name": "niah", "lengths": [10]}], "kv_policy": {"name": "fulll"}}
    )
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, registry)
    locs = dict(exc.value.errors)
    assert "benchmarks[0].lengths" in locs
    assert "Did you mean 'full'" in locs["kv_policy.name"]


def test_unknown_option(registry):
    cfg = parse_config({"kv_policy": {"name": "full", "compression_ratio": 0.5}})
    with pytest.raises(ConfigError, match="kv_policy.compression_ratio"):
        resolve_config(cfg, registry)


class Picky(KVPolicy):
    name = "picky"
    summary = "needs sparse attention"
    incompatible_with = {"attention": ["dense"]}


def test_incompatible_combination_refused(registry):
    reg = Registry()
    for spec in registry.specs():
        reg.add(spec)
    reg.register_function("kv-policy", "tests", "0")(Picky)
    cfg = parse_config({"kv_policy": {"name": "picky"}})
    with pytest.raises(ConfigError, match="cannot be combined with attention 'dense'"):
        resolve_config(cfg, reg)


def test_sweep_and_grid_expand(registry):
    cfg = parse_config(
        {
            "sweep": [{"label": "a"}, {"label": "b", "prompt": {"name": "zero-shot"}}],
            "grid": {"allocator.cap_bytes": [1000, 2000]},
        }
    )
    variants = resolve_config(cfg, registry)
    assert [v.label for v in variants] == [
        "a[allocator.cap_bytes=1000]",
        "a[allocator.cap_bytes=2000]",
        "b[allocator.cap_bytes=1000]",
        "b[allocator.cap_bytes=2000]",
    ]
    assert variants[1].configs["allocator"].cap_bytes == 2000


def test_default_config_is_valid(registry):
    assert resolve_config(RunConfig(), registry)[0].label == "baseline"


def test_unknown_option_suggests_the_nearest_and_lists_the_valid_ones(registry):
    cfg = parse_config({"benchmarks": [{"name": "niah", "lenghts": [256]}]})
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, registry)
    msg = dict(exc.value.errors)["benchmarks[0].lenghts"]
    assert "Did you mean 'lengths'?" in msg and "depths" in msg and "samples" in msg


def test_unknown_table_suggests_the_field():
    with pytest.raises(ConfigError) as exc:
        parse_config({"prompt_strategy": {"name": "zero-shot"}})
    msg = dict(exc.value.errors)["prompt_strategy"]
    assert "Did you mean 'prompt'?" in msg and "kv_policy" in msg


def test_harness_options_are_validated_by_the_core():
    with pytest.raises(ConfigError, match="Did you mean 'time_budget_s'"):
        parse_config({"harness": {"time_budget": 5}})
    with pytest.raises(ConfigError, match="kv-polcy"):
        parse_config({"harness": {"sweep_installed": {"kinds": ["kv-polcy"]}}})


def test_deeply_nested_config_is_a_config_error(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid TOML"):
        load_config(deep)
    with pytest.raises(ConfigError, match="nested too deeply|invalid"):
        value: list = []
        for _ in range(3000):
            value = [value]
        parse_config({"grid": {"kv_policy.x": value}})


@pytest.mark.parametrize("device", ["tpu0", "gpu", "cuda:x", ""])
def test_bad_device_name_is_refused_by_the_config(device):
    with pytest.raises(ConfigError, match="model.device"):
        parse_config({"model": {"device": device}})


def test_a_class_can_be_registered_directly():
    reg = Registry()
    reg.register_function("kv-policy", "tests", "0")(Picky)
    spec = reg.get("kv-policy", "picky")
    assert spec.summary == "needs sparse attention" and spec.component_class() is Picky
    with pytest.raises(Exception, match="kind 'kv-policy', not 'attention'"):
        reg.register_function("attention", "tests", "0")(Picky)


def test_wilson_interval():
    from apportion.stats import accuracy_interval, separated, wilson

    low, high = wilson(1, 2)
    assert 0.09 < low < 0.1 and 0.9 < high < 0.91  # 1 of 2 says almost nothing
    assert wilson(0, 10)[0] == 0.0 and 0.27 < wilson(0, 10)[1] < 0.28
    assert wilson(10, 10)[1] > 0.9999 and wilson(0, 0) == (0.0, 1.0)
    mean, lo, hi, n = accuracy_interval([1, 1, 0, 1])
    assert n == 4 and mean == 0.75 and lo < 0.75 < hi
    assert not separated(wilson(1, 2), wilson(2, 2))  # 50 points apart, not a winner
    assert separated(wilson(36, 36), wilson(10, 36))


def test_sweep_installed_grid_and_only_with(registry):
    from apportion.runner import expand_installed

    reg = Registry()
    for spec in registry.specs():
        reg.add(spec)

    class Budgeted(KVPolicy):
        name = "budgeted"
        summary = "takes a compression ratio"
        Config = __import__("apportion.host.kv", fromlist=["x"]).CompressionConfig

    reg.register_function("kv-policy", "tests", "0")(Budgeted)
    reg.register_function("kv-policy", "tests", "0")(Picky)  # no compression_ratio
    cfg = parse_config(
        {
            "harness": {
                "sweep_installed": {
                    "kinds": ["kv-policy"],
                    "grid": {"compression_ratio": [0.5, 0.75]},
                    "only_with": ["compression_ratio"],
                }
            }
        }
    )
    expanded, skipped = expand_installed(cfg, reg, cfg.harness.sweep_installed)
    labels = [v.label for v in expanded.sweep]
    assert labels == [
        "baseline",
        "budgeted(compression_ratio=0.5)",
        "budgeted(compression_ratio=0.75)",
    ]
    assert skipped == []  # left out because the study is about ratios, silently
