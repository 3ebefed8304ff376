import pytest
from apportion.config import RunConfig, load_config, parse_config, resolve_config
from apportion.errors import ConfigError, DuplicateComponentError, UnknownComponentError
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
    with pytest.raises(DuplicateComponentError, match="one 1.*two 2"):
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


def test_incompatible_combination_refused(registry):
    reg = Registry()
    for spec in registry.specs():
        reg.add(spec)
    reg.add(
        ComponentSpec(
            "kv-policy",
            "picky",
            "apportion.host.kv:KVPolicy",
            summary="s",
            incompatible_with={"attention": ["dense"]},
        )
    )
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
