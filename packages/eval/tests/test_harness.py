"""``apportion run`` with apportion-eval installed: sweeps, resume, records, bad input, the
report (the loop is the core's :func:`apportion.runner.execute`; eval renders the report)."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from apportion.config import parse_config, resolve_config
from apportion.errors import ConfigError
from apportion.records import read_records
from apportion.runner import RunOptions, execute, expand_installed

FAST = {"max_new_tokens": 6}


def _cfg(**kw):
    data = {
        "name": "t",
        "generation": FAST,
        "benchmarks": [
            {"name": "niah", "lengths": [192], "depths": [0.25, 0.75], "samples": 1},
            {"name": "holobench", "lengths": [256], "queries": ["count"], "samples": 1},
        ],
        "sweep": [{"label": "a"}, {"label": "b", "prompt": {"name": "zero-shot"}}],
    }
    data.update(kw)
    return parse_config(data)


# ------------------------------------------------------------------- no model needed
def test_sweep_installed_adds_every_component_with_matching_options(registry):
    cfg = parse_config(
        {
            "harness": {
                "sweep_installed": {
                    "kinds": ["kv-policy", "attention"],
                    "options": {"compression_ratio": 0.5},
                }
            }
        }
    )
    expanded, skipped = expand_installed(cfg, registry, cfg.harness.sweep_installed)
    labels = {v.label: v for v in expanded.sweep}
    assert next(iter(labels)) == "baseline"
    for kind, field in (("kv-policy", "kv_policy"), ("attention", "attention")):
        for spec in registry.specs(kind):
            if spec.name in ("full", "dense"):
                continue
            variant = next(
                (
                    v
                    for v in expanded.sweep
                    if getattr(v, field) and getattr(v, field).name == spec.name
                ),
                None,
            )
            if variant is None:
                assert any(spec.name in s for s in skipped), spec.name
                continue
            has = "compression_ratio" in spec.config_model().model_fields
            assert (getattr(variant, field).options == {"compression_ratio": 0.5}) is has, spec.name
    resolve_config(expanded, registry)  # every added variant validates


def test_benchmark_labels_tell_entries_apart():
    from apportion.runner import benchmark_labels

    a = {"variant": "single", "lengths": [1024], "seed": 0}
    b = {"variant": "multi-key", "lengths": [1024], "seed": 0}
    assert benchmark_labels(["niah", "niah", "holobench"], [a, b, {}]) == [
        "niah[variant=single]",
        "niah[variant=multi-key]",
        "holobench",
    ]
    assert benchmark_labels(["niah", "niah"], [a, a]) == ["niah#0", "niah#1"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"benchmarks": [{"name": "niha"}]}, "Did you mean 'niah'"),
        ({"benchmarks": [{"name": "niah", "depth": [0.5]}]}, r"benchmarks\[0\]\.depth"),
        (
            {"benchmarks": [{"name": "holobench", "placement": "top"}]},
            r"benchmarks\[0\]\.placement",
        ),
        ({"harness": {"sweep_installd": {}}}, r"harness\.sweep_installd"),
        ({"harness": {"sweep_installed": {"kinds": ["kv-polcy"]}}}, "kv-polcy"),
        (
            {"kv_policy": {"name": "full", "compression_ratio": 0.5}},
            r"kv_policy\.compression_ratio",
        ),
    ],
)
def test_bad_config_is_refused_before_the_model_loads(tmp_path, data, match):
    # loaded=None: reaching the model load would take seconds; the error must come first
    with pytest.raises(ConfigError, match=match):
        execute(parse_config(data), tmp_path / "r", RunOptions(progress=False))
    assert not (tmp_path / "r" / "records.jsonl").exists()


def test_incompatible_combination_is_refused(tmp_path):
    from apportion.host.kv import KVPolicy
    from apportion.plugins import get_plugin_host, reset

    class NeedsSparse(KVPolicy):
        name = "test-needs-sparse"
        summary = "test"
        incompatible_with = {"attention": ["dense"]}

    host = get_plugin_host()
    host.registry.register_function("kv-policy", "tests", "0")(NeedsSparse)
    try:
        cfg = parse_config({"kv_policy": {"name": "test-needs-sparse"}})
        with pytest.raises(ConfigError, match="cannot be combined with attention 'dense'"):
            execute(cfg, tmp_path / "r", RunOptions(progress=False))
        # sweep_installed leaves such a component out, saying why, instead of failing the sweep
        cfg = parse_config({"harness": {"sweep_installed": {"kinds": ["kv-policy"]}}})
        _, skipped = expand_installed(cfg, host.registry, cfg.harness.sweep_installed)
        assert any("test-needs-sparse" in s and "dense" in s for s in skipped)
    finally:
        reset()


def test_render_run_writes_the_report_with_the_notes(tmp_path):
    import io

    from apportion.runner import RunResult
    from apportion_eval.report import render_run
    from rich.console import Console

    rec = {
        "variant": "a",
        "benchmark": "niah",
        "sample_id": "s0",
        "length": 192,
        "depth": 0.5,
        "score": 1.0,
        "peak_kv_bytes": 2**20,
        "prefill_seconds": 0.1,
        "decode_tokens_per_s": 10.0,
        "prompt_tokens": 190,
        "tags": {"diffusion": "low", "scope": "small"},
        "answers": ["1234567"],
        "prediction": "1234567",
    }
    run = RunResult(
        parse_config({"name": "t"}), tmp_path, [rec], notes=["2 samples not run (time budget)"]
    )
    out = io.StringIO()
    path = render_run(run, Console(file=out, width=200))
    assert path == tmp_path / "report.html"
    assert "2 samples not run (time budget)" in path.read_text()
    assert "t: 1 records" in out.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left


# ------------------------------------------------------------------- with the model
def test_unwritable_run_dir(tmp_path, smollm2):
    if os.geteuid() == 0:
        target = "/proc/apportion-eval-cannot-write"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    with pytest.raises(ConfigError, match="not writable"):
        execute(_cfg(), target, RunOptions(progress=False), loaded=smollm2)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [([9000], "exceed the model's context"), ([8190], "answer tokens exceeds")],
)
def test_length_beyond_context_refused_before_samples(tmp_path, smollm2, lengths, match):
    cfg = parse_config({"benchmarks": [{"name": "niah", "lengths": lengths}]})
    with pytest.raises(ConfigError, match=match):
        execute(cfg, tmp_path / "r", RunOptions(progress=False), loaded=smollm2)
    assert not (tmp_path / "r" / "records.jsonl").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smollm2):
    """A real two-config sweep, interrupted twice and resumed: (run_dir, stages)."""
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    first = execute(_cfg(), run_dir, RunOptions(limit=1, progress=False), loaded=smollm2)
    with open(run_dir / "records.jsonl", "a") as f:  # a crash mid-write leaves a torn line
        f.write('{"variant": "a", "bench')
    stopped = execute(
        _cfg(harness={"time_budget_s": 1e-6}), run_dir, RunOptions(progress=False), loaded=smollm2
    )
    final = execute(_cfg(), run_dir, RunOptions(progress=False), loaded=smollm2)
    return run_dir, {"first": first, "stopped": stopped, "final": final}


def test_interrupted_run_resumes(finished_run):
    run_dir, st = finished_run
    assert len(st["first"].records) == 4  # limit 1 per benchmark x 2 configs
    assert st["stopped"].pending == 2 and len(st["stopped"].records) == 4
    final = st["final"].records
    assert len(final) == 6 and st["final"].pending == 0
    lines = read_records(run_dir / "records.jsonl")
    assert len(lines) == 6  # the torn line is dropped, nothing was measured twice
    firsts = {
        (r["variant"], r["benchmark"], r["sample_id"]): r["time"] for r in st["first"].records
    }
    assert all(
        r["time"] == firsts[k]
        for r in final
        if (k := (r["variant"], r["benchmark"], r["sample_id"])) in firsts
    )


def test_records_carry_the_measurements(finished_run):
    _, st = finished_run
    for r in st["final"].records:
        assert "error" not in r, r.get("error")
        assert 0.0 <= r["score"] <= 1.0
        assert r["peak_kv_bytes"] > 0 and r["prefill_seconds"] > 0 and r["prompt_tokens"] > 0
        assert r["decode_tokens_per_s"] >= 0 and r["tags"]["diffusion"] and r["tags"]["scope"]
        assert abs(r["prompt_tokens"] - r["length"]) <= 0.02 * r["length"]
    assert {r["variant"] for r in st["final"].records} == {"a", "b"}
    assert json.loads((finished_run[0] / "config.json").read_text())["name"] == "t"


def test_changed_seed_is_remeasured_not_reused(finished_run, smollm2):
    run_dir, _ = finished_run
    cfg = _cfg(
        benchmarks=[{"name": "niah", "lengths": [192], "depths": [0.25], "samples": 1}],
        sweep=[{"label": "a"}],
    )
    res = execute(cfg, run_dir, RunOptions(seed=99, progress=False), loaded=smollm2)
    (rec,) = res.records
    old = [
        r
        for r in read_records(run_dir / "records.jsonl")
        if r["sample_id"] == rec["sample_id"] and r["variant"] == "a"
    ]
    assert len(old) == 2 and old[0]["sample_hash"] != old[1]["sample_hash"] and rec["seed"] == 99


def _chromium():
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


def test_report_renders_in_chromium(finished_run):
    run_dir, st = finished_run
    report = st["final"].report
    assert report is not None and report == run_dir / "report.html"
    html = report.read_text()
    n_imgs = html.count("<img ")
    assert n_imgs >= 3 and "Pareto" in html and "diffusion" in html
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is not installed but CI is set: the report must be checked in a browser"
            )
        pytest.skip("chromium not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
        ]
        dom = subprocess.run(
            [browser, *flags, "--dump-dom", report.as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
        )
        shot = Path(profile) / "shot.png"
        subprocess.run(
            [browser, *flags, f"--screenshot={shot}", "--window-size=1400,2000", report.as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert shot.is_file() and shot.stat().st_size > 10_000
    assert f'data-images-decoded="{n_imgs}"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-natural-width="0"' not in dom.stdout


def test_report_command_rerenders(finished_run, tmp_path):
    import sys

    run_dir, _ = finished_run
    (run_dir / "report.html").unlink()
    out = subprocess.run(
        [sys.executable, "-m", "apportion.cli", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (run_dir / "report.html").is_file() and "accuracy" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "apportion.cli", "report", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        out.returncode == 2
        and "not a run directory" in out.stderr
        and "Traceback" not in out.stderr
    )


def test_time_budget_option_overrides_the_config(tmp_path, smollm2):
    # `apportion run --time-budget` arrives as RunOptions.time_budget_s and wins over [harness]
    res = execute(
        _cfg(harness={"time_budget_s": 3600}),
        tmp_path / "r",
        RunOptions(time_budget_s=1e-6, progress=False),
        loaded=smollm2,
    )
    assert res.records == [] and res.pending > 0


def test_a_sample_needing_more_answer_tokens_than_fit_is_refused_before_generation(
    tmp_path, smollm2
):
    # multi-value niah asks for more new tokens than the benchmark's 32: the length passes the
    # config-level check, the built samples do not
    length = smollm2.max_context - 40
    cfg = parse_config(
        {
            "benchmarks": [
                {
                    "name": "niah",
                    "variant": "multi-value",
                    "lengths": [length],
                    "depths": [0.5],
                    "samples": 1,
                }
            ]
        }
    )
    with pytest.raises(
        ConfigError, match=rf"samples of length {length} \+ up to \d+ answer tokens"
    ):
        execute(cfg, tmp_path / "r", RunOptions(progress=False), loaded=smollm2)
    assert not (tmp_path / "r" / "records.jsonl").exists()
