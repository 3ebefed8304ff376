"""The run loop under faults a user meets: a study too big for its time budget, a component
that raises on one sample, Ctrl-C, and a run with no terminal (real model, real files)."""

from __future__ import annotations

import io

import pytest
from apportion.config import parse_config
from apportion.plugins import get_registry
from apportion.runner import RunOptions, execute, read_records, summarize
from rich.console import Console


def _cfg(**kw):
    return parse_config(
        {
            "name": "t",
            "benchmarks": [{"name": "niah", "lengths": [256], "depths": [0.5], "samples": 3}],
            "generation": {"sample_batch_size": 1},
            **kw,
        }
    )


def _niah() -> type:
    """The class behind ``niah`` (the core's baseline, or the eval family's when installed)."""
    return get_registry().get("benchmark", "niah").component_class()


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_study_that_cannot_fit_says_so_before_starting(tmp_path, smollm2):
    console, out = _console()
    result = execute(
        _cfg(),
        tmp_path / "run",
        RunOptions(time_budget_s=0.05, progress=False),
        loaded=smollm2,
        console=console,
    )
    text = out.getvalue()
    assert "this study needs about" in text and "of the time budget are left" in text
    assert "to fit, cut: fewer configs (1 now)" in text and "shorter lengths" in text
    assert len(result.records) < 3  # what did not fit is left for a rerun, not rushed


def test_a_sample_that_raises_is_an_error_row_and_the_run_goes_on(tmp_path, smollm2, monkeypatch):
    niah = _niah()
    real_score = niah.score
    calls = {"n": 0}

    def flaky(self, sample, prediction):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("scorer broke on this sample")
        return real_score(self, sample, prediction)

    monkeypatch.setattr(niah, "score", flaky)
    records = execute(_cfg(), tmp_path / "run", RunOptions(progress=False), loaded=smollm2).records
    assert len(records) == 3
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["error"] == "ValueError: scorer broke on this sample"
    assert errors[0]["error_kind"] == "exception" and errors[0]["score"] == 0.0
    assert all("prediction" in r for r in records if "error" not in r)
    (row,) = summarize(records)
    assert row["n"] == 3 and row["errors"] == 1


def test_ctrl_c_keeps_every_finished_record_and_the_rerun_resumes(tmp_path, smollm2, monkeypatch):
    niah = _niah()
    real_score = niah.score
    calls = {"n": 0}

    def interrupted(self, sample, prediction):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_score(self, sample, prediction)

    monkeypatch.setattr(niah, "score", interrupted)
    run_dir = tmp_path / "run"
    console, out = _console()
    with pytest.raises(KeyboardInterrupt):
        execute(_cfg(), run_dir, RunOptions(progress=False), loaded=smollm2, console=console)
    assert "interrupted: every finished sample is saved" in out.getvalue()
    kept = read_records(run_dir / "records.jsonl")
    assert len(kept) == 1 and "error" not in kept[0]
    monkeypatch.setattr(niah, "score", real_score)
    again = execute(_cfg(), run_dir, RunOptions(progress=False), loaded=smollm2).records
    assert len(again) == 3
    assert again[0]["sample_id"] == kept[0]["sample_id"] and again[0]["time"] == kept[0]["time"]


def test_without_a_terminal_progress_is_a_log_line_every_few_samples(tmp_path, smollm2):
    console, out = _console()
    execute(
        _cfg(),
        tmp_path / "run",
        RunOptions(progress=None, log_every=2),
        loaded=smollm2,
        console=console,
    )
    lines = [ln for ln in out.getvalue().splitlines() if " samples, " in ln and "ETA" in ln]
    assert [ln.split(" ")[0] for ln in lines] == ["2/3", "3/3"]
    assert "baseline" in lines[0]  # the current config
