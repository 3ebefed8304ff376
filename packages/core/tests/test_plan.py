import json

import pytest
from apportion.errors import ConfigError
from apportion.plan import HARDWARE, MODELS, ModelShape, Plan, compare_with_paper, resolve_model


def test_reproduces_paper_within_15_percent():
    rows = compare_with_paper()
    assert len(rows) == 6
    for r in rows:
        assert abs(r["rel_error"]) <= 0.15, r


def test_kv_bytes_per_token_by_hand():
    # 60 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes
    assert MODELS["yi-34b"].kv_bytes_per_token == 60 * 8 * 128 * 2 * 2
    plan = Plan(MODELS["yi-34b"], HARDWARE["a100-80gb"], 50_000)
    assert plan.kv_bytes_per_user == 245_760 * 50_000
    assert plan.context_switch_seconds() == pytest.approx(12.288e9 / 25e9)


def test_shape_from_hf_config_matches_smollm2():
    cfg = {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    shape = ModelShape.from_hf_config(cfg, "smol")
    assert shape.params == pytest.approx(134.5e6, rel=0.01)
    assert shape.kv_bytes_per_token == MODELS["smollm2-135m"].kv_bytes_per_token


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="lacks a usable field"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"hidden_size": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json
        b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}",  # parses, deeper than any HF config
        b"[1, 2, 3]",
        b"\xff\xfe not utf-8",
    ],
    ids=["deeper-than-the-parser", "deep", "not-an-object", "not-utf-8"],
)
def test_a_hostile_config_json_is_a_config_error(tmp_path, raw):
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(ConfigError, match="config"):
        resolve_model(str(tmp_path))


def test_cli_plan_json(cli, cli_env):
    out = cli("plan", "--json", "--paper", "--context", "50000", env=cli_env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["plans"][0]["max_concurrent_users"] == 1
    out = cli("plan", "--hardware", "tpu9", env=cli_env)
    assert out.returncode == 2 and "presets" in out.stderr
