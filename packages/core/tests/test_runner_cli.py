import json
import os

import pytest
from apportion.config import parse_config
from apportion.errors import ConfigError
from apportion.runner import RunOptions, execute, read_records


def _cfg(**kw):
    return parse_config({"name": "t", "benchmarks": [{"name": "niah", "lengths": [256], "depths": [0.5],
                                                      "samples": 3}], **kw})


def test_run_writes_records_and_resumes(tmp_path, smollm2):
    run_dir = tmp_path / "run"
    first = execute(_cfg(), run_dir, RunOptions(limit=2, progress=False), loaded=smollm2)
    assert len(first) == 2 and all(0 <= r["score"] <= 1 for r in first)
    # simulate a crash mid-write: a torn last line is ignored, not fatal
    with open(run_dir / "records.jsonl", "a") as f:
        f.write('{"variant": "baseline", "bench')
    again = execute(_cfg(), run_dir, RunOptions(progress=False), loaded=smollm2)
    assert len(again) == 3  # two kept, one new
    assert [r["sample_id"] for r in again][:2] == [r["sample_id"] for r in first]


def test_same_seed_same_samples(tmp_path, smollm2):
    a = execute(_cfg(seed=5), tmp_path / "a", RunOptions(limit=1, progress=False), loaded=smollm2)
    b = execute(_cfg(seed=5), tmp_path / "b", RunOptions(limit=1, progress=False), loaded=smollm2)
    assert a[0]["answers"] == b[0]["answers"] and a[0]["prediction"] == b[0]["prediction"]


def test_unwritable_run_dir(tmp_path, smollm2):
    if os.geteuid() == 0:
        target = "/proc/apportion-cannot-write-here"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    with pytest.raises(ConfigError, match="not writable"):
        execute(_cfg(), target, RunOptions(progress=False), loaded=smollm2)


def test_length_beyond_context_refused(tmp_path, smollm2):
    cfg = parse_config({"benchmarks": [{"name": "niah", "lengths": [20000]}]})
    with pytest.raises(ConfigError, match="exceed the model's context"):
        execute(cfg, tmp_path / "r", RunOptions(progress=False), loaded=smollm2)
    assert not (tmp_path / "r" / "records.jsonl").exists()


def test_cli_plugins_and_list(cli, cli_env):
    out = cli("plugins", "--json", env=cli_env)
    assert out.returncode == 0, out.stderr
    assert any(p["name"] == "core" for p in json.loads(out.stdout))
    out = cli("list", "kv-policy", "--json", env=cli_env)
    items = json.loads(out.stdout)
    assert {"name", "provider", "version", "summary", "config"} <= set(items[0])


def test_cli_errors_are_clear(cli, cli_env, tmp_path):
    out = cli("list", "kv-polcy", env=cli_env)
    assert out.returncode == 2 and "Did you mean 'kv-policy'" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[kv_policy]\nname = "snapkvv"\n')
    out = cli("run", str(bad), env=cli_env)
    assert out.returncode == 2 and "kv_policy.name" in out.stderr and "Traceback" not in out.stderr
    out = cli("generate", "hi", "--model", "./missing-model", env=cli_env)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_cli_run_end_to_end(cli, cli_env, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "e2e"\n[[benchmarks]]\nname = "niah"\nlengths = [256]\ndepths = [0.5]\nsamples = 1\n')
    out = cli("run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", env=cli_env)
    assert out.returncode == 0, out.stderr
    assert len(read_records(tmp_path / "run" / "records.jsonl")) == 1


def test_cli_doctor(cli, cli_env):
    out = cli("doctor", env=cli_env)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "transformers", "triton", "device", "plugins"):
        assert word in out.stdout
