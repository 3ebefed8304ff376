import json
import os
import time

import pytest
from apportion.config import parse_config
from apportion.errors import ConfigError
from apportion.plugins import get_registry
from apportion.runner import RunOptions, execute, read_records


def _cfg(**kw):
    return parse_config(
        {
            "name": "t",
            "benchmarks": [{"name": "niah", "lengths": [256], "depths": [0.5], "samples": 3}],
            **kw,
        }
    )


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
    assert (
        out.returncode == 2
        and "Did you mean 'kv-policy'" in out.stderr
        and "Traceback" not in out.stderr
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[kv_policy]\nname = "snapkvv"\n')
    out = cli("run", str(bad), env=cli_env)
    assert out.returncode == 2 and "kv_policy.name" in out.stderr and "Traceback" not in out.stderr
    out = cli("generate", "hi", "--model", "./missing-model", env=cli_env)
    assert out.returncode == 2 and "does not exist" in out.stderr


@pytest.mark.parametrize(
    "value", ["[" * 50_000, "[" * 100 + "]" * 100], ids=["deeper-than-the-parser", "deep"]
)
def test_cli_refuses_a_deeply_nested_option_value_in_one_line(cli, cli_env, value):
    out = cli("generate", "hi", "--kv-option", f"compression_ratio={value}", env=cli_env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "option 'compression_ratio'" in out.stderr and "nested" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_run_end_to_end(cli, cli_env, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'name = "e2e"\n[[benchmarks]]\nname = "niah"\n'
        "lengths = [256]\ndepths = [0.5]\nsamples = 1\n"
    )
    out = cli("run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", env=cli_env)
    assert out.returncode == 0, out.stderr
    assert len(read_records(tmp_path / "run" / "records.jsonl")) == 1


def test_cli_doctor(cli, cli_env):
    out = cli("doctor", env=cli_env)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "transformers", "triton", "device", "plugins"):
        assert word in out.stdout


# ------------------------------------------------------------------- time budget
def test_time_budget_stops_starting_samples_and_a_rerun_finishes(tmp_path, smollm2):
    run_dir = tmp_path / "run"
    stopped = execute(
        _cfg(), run_dir, RunOptions(time_budget_s=1e-6, progress=False), loaded=smollm2
    )
    assert stopped.records == []  # spent before the first sample: nothing started, nothing torn
    done = execute(_cfg(), run_dir, RunOptions(limit=1, progress=False), loaded=smollm2)
    assert len(done) == 1


@pytest.mark.parametrize("bad", [0, -5.0])
def test_time_budget_must_be_positive(bad):
    with pytest.raises(ConfigError, match="positive number of seconds"):
        RunOptions(time_budget_s=bad)


def test_cli_run_time_budget_option(cli, cli_env, tmp_path):
    out = cli("run", "--help", env={**cli_env, "COLUMNS": "200"})
    assert out.returncode == 0 and "--time-budget" in out.stdout and "SECONDS" in out.stdout
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "tb"\n[[benchmarks]]\nname = "niah"\nlengths = [256]\n')
    out = cli("run", str(cfg), "--time-budget", "0", "--out", str(tmp_path / "r"), env=cli_env)
    assert (
        out.returncode == 2
        and "positive number of seconds" in out.stderr
        and "Traceback" not in out.stderr
    )
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------- length + new tokens
def test_length_plus_new_tokens_beyond_context_refused(tmp_path, smollm2):
    window = smollm2.max_context
    cfg = parse_config({"benchmarks": [{"name": "niah", "lengths": [window - 10]}]})
    with pytest.raises(ConfigError) as err:
        execute(cfg, tmp_path / "r", RunOptions(progress=False), loaded=smollm2)
    msg = str(err.value)  # both numbers, the sum and the window
    assert f"length {window - 10} + 32 answer tokens" in msg and f"({window + 22} > {window}" in msg
    assert not (tmp_path / "r" / "records.jsonl").exists()
    # the same length fits once fewer tokens are generated
    from apportion.runner import check_lengths

    ok = parse_config(
        {
            "benchmarks": [{"name": "niah", "lengths": [window - 10]}],
            "generation": {"max_new_tokens": 10},
        }
    )
    check_lengths(ok, get_registry(), window, {"baseline": False})
    check_lengths(cfg, get_registry(), window, {"baseline": True})  # context-extending attention


def test_a_sample_asking_for_more_new_tokens_is_refused_before_generation():
    from apportion.base import Benchmark, Sample
    from apportion.runner import check_samples

    cfg = parse_config({})
    bench = Benchmark()  # 48 new tokens by default
    fits = Sample("a", "ctx", "q?", ["x"], length=8000)
    greedy = Sample("b", "ctx", "q?", ["x"], length=8000, max_new_tokens=300)
    check_samples(cfg, [("b1", bench, fits)], 8192, {"baseline": False})
    with pytest.raises(ConfigError, match=r"length 8000 \+ up to 300 answer tokens.*8300 > 8192"):
        check_samples(cfg, [("b1", bench, fits), ("b1", bench, greedy)], 8192, {"baseline": False})
    capped = parse_config({"generation": {"max_new_tokens": 100}})  # the run's setting wins
    check_samples(capped, [("b1", bench, greedy)], 8192, {"baseline": False})


# ---------------------------------------------------------------- demos and budget
class _Recorder:
    """A real zero-shot strategy that remembers what the runner passed to build()."""

    def __init__(self):
        from apportion.base import PromptStrategy

        self.inner = PromptStrategy()
        self.calls = []

    def build(self, query, **kw):
        self.calls.append(kw)
        return self.inner.build(query, **kw)


def _demo_bench(demos):
    from apportion.base import Benchmark, Sample

    class WithDemos(Benchmark):
        name = "with-demos"
        max_new_tokens = 4

        def samples(self, tokenizer):
            yield Sample("s0", "The code is 12.", "What is the code?", ["12"], length=16)

        def demos(self, sample):
            return demos

    return WithDemos()


def test_runner_passes_demos_and_a_budget_to_the_prompt_strategy(smollm2):
    from apportion.host import Host
    from apportion.runner import run_sample

    host = Host(smollm2)
    pool = [("What is 2 + 2?", "4"), {"input": "Capital of France?", "output": "Paris"}]
    bench = _demo_bench(pool)
    sample = next(bench.samples(smollm2.tokenizer))
    strategy = _Recorder()
    rec = run_sample(host, strategy, bench, sample, None)
    call = strategy.calls[-1]
    assert list(call["demos"]) == pool
    assert call["budget"] == smollm2.max_context - 4 == rec["prompt_budget"]
    assert rec["demos_offered"] == 2 and rec["prompt_accounting"]["demos_offered"] == 2
    # a configured budget wins; max_new_tokens of the run moves the default
    run_sample(host, strategy, bench, sample, None, budget=500)
    assert strategy.calls[-1]["budget"] == 500
    run_sample(host, strategy, bench, sample, 6)
    assert strategy.calls[-1]["budget"] == smollm2.max_context - 6


def test_without_demos_the_strategy_is_called_zero_shot(smollm2):
    from apportion.host import AttentionBackend, Host
    from apportion.runner import prompt_budget, run_sample

    bench = _demo_bench([])
    sample = next(bench.samples(smollm2.tokenizer))
    strategy = _Recorder()
    rec = run_sample(Host(smollm2), strategy, bench, sample, None)
    assert "demos" not in strategy.calls[-1] and "budget" not in strategy.calls[-1]
    assert "prompt_budget" not in rec

    class Extends(AttentionBackend):
        extends_context = True

    assert prompt_budget(Host(smollm2, Extends()), 4) is None  # no window to stay inside
    assert prompt_budget(Host(smollm2, Extends()), 4, 700) == 700


def test_config_prompt_budget_reaches_the_strategy(tmp_path, smollm2):
    cfg = _cfg(generation={"prompt_budget": 20, "max_new_tokens": 4})
    records = execute(cfg, tmp_path / "r", RunOptions(limit=1, progress=False), loaded=smollm2)
    # the zero-shot strategy refuses a prompt over its budget: a recorded error, not a crash
    assert records[0]["score"] == 0.0 and "budget is 20" in records[0]["error"]


# ------------------------------------------------------------------- bad input
def test_bad_record_lines_are_skipped_reported_and_set_aside(tmp_path, smollm2):
    run_dir = tmp_path / "run"
    first = execute(_cfg(), run_dir, RunOptions(limit=2, progress=False), loaded=smollm2)
    path = run_dir / "records.jsonl"
    with open(path, "ab") as f:
        # a later line for a measured sample, whose score the summary cannot read
        f.write(json.dumps({**first.records[0], "score": "x"}).encode() + b"\n")
        f.write(b"\xff\xfe not utf-8\n")
        f.write(b'{"valid": "json", "but": "not a record"}\n')
        f.write(b"[1, 2, 3]\n")
        f.write(b'{"variant": "baseline", "bench')  # a torn last line
    again = execute(_cfg(), run_dir, RunOptions(progress=False), loaded=smollm2)
    assert len(again.records) == 3  # the two measured before are kept, one new
    assert [r["sample_id"] for r in again.records][:2] == [r["sample_id"] for r in first]
    assert again.records[0]["score"] == first.records[0]["score"]
    assert any(
        "5 line(s)" in n and 'score "x" is not a number in [0, 1]' in n and "not UTF-8" in n
        for n in again.notes
    )
    rejected = (run_dir / "records.rejected.jsonl").read_bytes()
    assert rejected.count(b"\n") == 5 and b"not a record" in rejected
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["variant"] == "baseline" for line in lines)


def test_lengths_past_the_window_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    from apportion.host import model as host_model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(host_model, "load_model", no_load)
    cfg = parse_config({"benchmarks": [{"name": "niah", "lengths": [10_000_000]}]})
    with pytest.raises(ConfigError, match="exceed the model's context of 8192"):
        execute(cfg, tmp_path / "r", RunOptions(progress=False))
    cfg = parse_config({"generation": {"max_new_tokens": 8192}})
    with pytest.raises(ConfigError, match="answer tokens exceeds"):
        execute(cfg, tmp_path / "r", RunOptions(progress=False))


#: a second kv-policy from a plugin, so that sweep_installed has something to sweep
SECOND_POLICY = """
from apportion.host.kv import KVPolicy

class Second(KVPolicy):
    name = "test-second"
    summary = "the full cache under a second name"
"""

SWEEP_PLUGIN = """
from apportion import hookimpl

@hookimpl
def apportion_register_kv_policies(register):
    register("secondpolicy:Second", name="test-second")
"""


def test_core_alone_runs_harness_options(plugin_dir, tmp_path):
    """[harness] is the core's: with no family installed but a plugin that adds a second
    kv-policy, sweep_installed sweeps it, time_budget_s stops the run and a rerun finishes it,
    and the core prints its plain table with the hint to install apportion-eval."""
    plugin_dir.module("secondpolicy", SECOND_POLICY)
    plugin_dir.add("sweepplug", SWEEP_PLUGIN)
    run_dir = str(tmp_path / "r")
    rc, out, err = plugin_dir.run(
        "import json\n"
        "from apportion.config import ModelSpec, parse_config\n"
        "from apportion.host import load_model\n"
        "from apportion.plugins import get_registry\n"
        "from apportion.runner import RunOptions, execute\n"
        "print('POLICIES', json.dumps(get_registry().names('kv-policy')))\n"
        "loaded = load_model(ModelSpec(name='smollm2', device='cpu', dtype='float32'))\n"
        "base = {'name': 'core-alone', 'benchmarks': [{'name': 'niah', 'lengths': [256],\n"
        "        'depths': [0.5], 'samples': 2}], 'generation': {'max_new_tokens': 2}}\n"
        "sweep = {'kinds': ['kv-policy']}\n"
        "for budget in (0.001, 600):\n"
        "    cfg = parse_config({**base, 'harness': {'sweep_installed': sweep,\n"
        "                                            'time_budget_s': budget}})\n"
        f"    run = execute(cfg, {run_dir!r}, RunOptions(progress=False), loaded=loaded)\n"
        "    print('RESULT', json.dumps({'variants': sorted({r['variant'] for r in run}),\n"
        "          'records': len(run.records), 'pending': run.pending, 'notes': run.notes}))\n",
        APPORTION_PLUGINS="sweepplug",  # no family: apportion-eval (and the rest) absent
        COLUMNS="200",
    )
    assert rc == 0, err
    head, first_line_and_rerun, second_line = out.split("RESULT ")
    first_json, _, rerun = first_line_and_rerun.partition("\n")
    first, second = json.loads(first_json), json.loads(second_line)
    assert json.loads(head.split("POLICIES ", 1)[1].splitlines()[0]) == ["full", "test-second"]
    # the budget was spent before the first sample: both swept configs' samples wait
    assert "2 configs x 2 samples: 4 to run, 0 already recorded" in head
    assert "time budget of 0.001 s spent: 4 samples left" in head
    assert first["records"] == 0 and first["pending"] == 4
    assert "4 samples not run (time budget)" in first["notes"]
    # the rerun, within its budget, measures both configs; nothing is left
    assert "2 configs x 2 samples: 4 to run, 0 already recorded" in rerun
    assert second == {
        "variants": ["baseline", "test-second"],
        "records": 4,
        "pending": 0,
        "notes": [],
    }
    # without apportion-eval the core prints its plain table, and says what would do more
    assert "core-alone: 0 records" in head and "core-alone: 4 records" in rerun
    table = rerun.split("core-alone: 4 records", 1)[1]
    assert "baseline" in table and "test-second" in table
    hint = "no report renderer installed (pip install apportion-eval)"
    assert head.count(hint) == 1 and rerun.count(hint) == 1
    assert not (tmp_path / "r" / "report.html").exists()


def test_cli_refuses_an_unknown_device_in_one_line(cli, cli_env):
    """``tpu0`` is no device on any machine: refused by the config, before any model loads."""
    t0 = time.monotonic()
    out = cli("generate", "hi", "--device", "tpu0", env=cli_env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "device" in out.stderr and "tpu0" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3
    assert time.monotonic() - t0 < 30  # refused before any model loads


def test_cli_refuses_a_device_this_machine_lacks_in_one_line(cli, cli_env, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    t0 = time.monotonic()
    out = cli("generate", "hi", "--device", "cuda", env=cli_env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "device" in out.stderr and len(out.stderr.strip().splitlines()) <= 3
    assert time.monotonic() - t0 < 30  # refused before any model loads
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\ndevice = "cuda"\n')
    out = cli("run", str(cfg), "--out", str(tmp_path / "r"), env=cli_env)
    assert out.returncode == 2 and "CUDA is not available" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_refuses_an_empty_prompt(cli, cli_env):
    for prompt in ("", "   \n"):
        out = cli("generate", prompt, env=cli_env)
        assert out.returncode == 2 and "prompt is empty" in out.stderr
        assert "Traceback" not in out.stderr


def test_a_broken_plugin_is_noted_in_the_run(plugin_dir, tmp_path):
    """A non-strict run with a broken plugin warns once, before the model loads (not once per
    sample or per plugin lookup); the note stays with the run (``run.notes``, which a report
    lists once more under the run's notes)."""
    plugin_dir.add("brokenplug", "raise ImportError('nope')\n")
    rc, out, err = plugin_dir.run(
        "import json\n"
        "from apportion.config import parse_config\n"
        "from apportion.runner import RunOptions, execute\n"
        "cfg = parse_config({'benchmarks': [{'name': 'niah', 'lengths': [256], "
        "'depths': [0.5], 'samples': 2}], 'generation': {'max_new_tokens': 2}})\n"
        f"run = execute(cfg, {str(tmp_path / 'r')!r}, RunOptions(progress=False))\n"
        "print('NOTES', json.dumps(run.notes))\n",
        COLUMNS="300",
    )
    assert rc == 0, err
    problem = "brokenplug (brokenplug 0.1.0): ImportError: nope"
    console, _, notes = out.rpartition("NOTES ")
    assert [n for n in json.loads(notes) if "brokenplug" in n] == [f"plugin problem: {problem}"]
    lines = console.splitlines()
    warnings = [i for i, line in enumerate(lines) if line.startswith("note ") and problem in line]
    assert len(warnings) == 1, console
    loaded = [i for i, line in enumerate(lines) if " samples: " in line and " to run" in line]
    assert loaded and warnings[0] < loaded[0]  # said before the model loaded
    listed = [i for i, line in enumerate(lines) if "brokenplug" in line and i not in warnings]
    heading = [i for i, line in enumerate(lines) if line.startswith("Notes on this run")]
    assert all(heading and i > heading[0] for i in listed) and len(listed) <= 1, console
    assert "brokenplug" not in err
