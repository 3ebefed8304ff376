"""The run report from synthetic records (no model): intervals and verdicts, the words at the
top, figures whose texts never overlap, and report.html rendered in headless Chromium."""

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from apportion.stats import wilson

CONFIGS = [
    # label, peak KV fraction, accuracy at the shortest length, loss per length step, errors
    ("baseline", 1.0, 0.97, 0.02, False),
    ("snapkv-0.5", 0.5, 0.95, 0.04, False),
    ("h2o-0.5", 0.5, 0.93, 0.05, False),
    ("streaming-0.25", 0.25, 0.55, 0.10, False),
    ("quest-0.5", 0.5, 0.90, 0.05, True),
    ("pyramidkv-0.3", 0.3, 0.80, 0.08, False),
]
BENCHES = ["niah", "needle-threading"]
LENGTHS = [1024, 2048, 4096]
DEPTHS = [0.0, 0.5, 1.0]
TAGS = {"niah": ("low", "small"), "needle-threading": ("high", "medium")}


def synthetic_records(samples: int = 4, seed: int = 0) -> list[dict]:
    """6 configs x 2 benchmarks x 3 lengths x 3 depths x ``samples`` records."""
    rng = random.Random(seed)
    out = []
    for label, kv, top, loss, errs in CONFIGS:
        for bench in BENCHES:
            for li, length in enumerate(LENGTHS):
                for depth in DEPTHS:
                    for s in range(samples):
                        p = (
                            top
                            - loss * li
                            - (0.15 if label.startswith("str") and depth == 0.5 else 0)
                        )
                        p -= 0.05 if bench == "needle-threading" else 0
                        rec = {
                            "variant": label,
                            "benchmark": bench,
                            "benchmark_name": bench,
                            "sample_id": f"{bench}-{length}-{depth}-{s}",
                            "length": length,
                            "depth": depth,
                            "tags": dict(zip(("diffusion", "scope"), TAGS[bench], strict=True)),
                            "answers": ["1234567"],
                            "components": {
                                "attention": "dense",
                                "kv_policy": "full" if label == "baseline" else label,
                                "prompt": "zero-shot",
                                "allocator": "none",
                            },
                            "model": "synthetic",
                            "context_chars": 4 * length,
                        }
                        if errs and length == 4096:
                            rec.update(
                                error="prompt of 4200 tokens exceeds the window",
                                error_kind="prompt-too-long",
                                score=0.0,
                            )
                        else:
                            hit = rng.random() < p
                            rec.update(
                                score=1.0 if hit else 0.0,
                                prediction="1234567" if hit else "The number is 123456.",
                                prompt_tokens=length,
                                peak_kv_bytes=int(kv * length * 24 * 1024),
                                prefill_seconds=0.001 * length,
                                decode_tokens_per_s=40.0,
                                batch_size=1,
                            )
                            if label in ("snapkv-0.5", "h2o-0.5"):
                                rec["shared_prefill"] = 2
                        out.append(rec)
    return out


def _by(rows):
    return {r["variant"]: r for r in rows}


# ----------------------------------------------------------------------------- numbers, words
def test_interval_text_is_the_wilson_interval():
    from apportion_eval.report_data import Acc

    acc = Acc.of([1.0] * 17 + [0.0])
    low, high = wilson(17, 18)
    assert (acc.mean, acc.low, acc.high, acc.n) == (17 / 18, low, high, 18)
    assert acc.text() == "94.4% (74-99)" == f"94.4% ({100 * low:.0f}-{100 * high:.0f})"
    assert Acc.of([]).text() == "-"


def test_verdicts_never_call_a_difference_inside_the_intervals_a_win():
    from apportion_eval.report_data import Acc, verdict

    base = Acc.of([1.0] * 10 + [0.0] * 2)  # 83%
    assert verdict(Acc.of([1.0] * 12), base) == "not told apart"  # 100%, but 12 samples
    assert verdict(Acc.of([1.0] * 200), Acc.of([1.0] * 100 + [0.0] * 100)) == "better"
    assert verdict(Acc.of([0.0] * 12), base) == "worse"


def test_config_rows_and_the_words_at_the_top():
    from apportion_eval.report_data import config_rows, headline

    records = synthetic_records()
    rows = _by(config_rows(records))
    assert [r["k"] for r in rows.values()] == [1, 2, 3, 4, 5, 6]
    assert rows["baseline"]["vs_baseline"] == "baseline"
    assert rows["streaming-0.25"]["vs_baseline"] == "worse"
    assert rows["snapkv-0.5"]["vs_baseline"] == "not told apart"
    assert rows["quest-0.5"]["errors"] == 24
    assert rows["quest-0.5"]["error_kinds"] == {"prompt-too-long": 24}
    for r in rows.values():
        assert r["acc"].n == 72
    words = headline(records)
    budgets = " ".join(words.budgets)
    # baseline and snapkv are on the front but not told apart: no winner is named
    assert "#1 baseline measures best" in budgets and "not told apart from #2 snapkv" in budgets
    assert "#1 baseline is best" not in budgets
    assert any(line.startswith("No better than the baseline: 5 of 5") for line in words.baseline)
    worse = next(line for line in words.baseline if line.startswith("Worse"))
    assert "#4 streaming-0.25" in worse and "#2 snapkv" not in worse
    assert any(
        "#5 quest-0.5: 24 of 72 records are errors (24 prompt-too-long)" in line
        for line in words.errors
    )
    assert any("shared one prefill" in line for line in words.measured)
    assert words.measured[0].startswith("Query-aware")
    agnostic = [dict(r, question_in_prefill=False) for r in records]
    assert headline(agnostic).measured[0].startswith("Query-agnostic")


def test_a_config_inside_the_baselines_interval_is_no_winner():
    from apportion_eval.report_data import config_rows, headline

    def rec(v, i, hit, kv):
        return {
            "variant": v,
            "benchmark": "b",
            "sample_id": str(i),
            "length": 100,
            "score": float(hit),
            "peak_kv_bytes": kv * 2**20,
        }

    records = [rec("baseline", i, i < 10, 8) for i in range(12)]
    records += [rec("cheap", i, True, 4) for i in range(12)]  # 100% at half the memory
    rows = config_rows(records)
    words = headline(records, rows)
    assert rows[1]["vs_baseline"] == "not told apart" and rows[1]["pareto"]
    assert not any("Better" in line for line in words.baseline)
    assert "No better than the baseline: 1 of 1 configs." in words.baseline
    # the cheap config is the only one within its budget, which is no claim of a win
    assert words.budgets[0].startswith("At <= 4.00 MiB peak KV, #2 cheap is the only config")


# ----------------------------------------------------------------------------- figures
def _figures(records):
    from apportion_eval.report_data import config_rows
    from apportion_eval.report_figures import (
        accuracy_chart,
        colours,
        depth_grids,
        length_chart,
        memory_chart,
    )

    rows = config_rows(records)
    cols = colours([r["variant"] for r in rows])
    figs = {"accuracy": accuracy_chart(rows, cols), "memory": memory_chart(rows, cols)[0]}
    figs["length"] = length_chart(records, cols)
    figs.update({f"grid {b}": f for b, f in depth_grids(records, cols)})
    return figs


def test_no_text_of_any_figure_overlaps_another():
    from apportion_eval.report_figures import text_boxes, text_overlaps

    figs = _figures(synthetic_records())
    assert set(figs) == {"accuracy", "memory", "length", "grid niah", "grid needle-threading"}
    for name, fig in figs.items():
        assert text_overlaps(fig) == [], name
    texts = [t for t, _ in text_boxes(figs["grid niah"])]
    # every measured depth x length cell of every config, with its n (and errors where any)
    assert sum(t.startswith(("0%", "25%", "50%", "75%", "100%")) for t in texts) == 6 * 9
    assert sum("\nn=4" in t for t in texts) == 6 * 9 and sum("4 err" in t for t in texts) == 3
    numbers = sorted(t.get_text() for t in figs["memory"].axes[0].texts)
    assert numbers == ["1", "2", "3", "4", "5", "6"]


def test_memory_labels_stay_apart_when_points_coincide():
    """Twenty configs at the same memory and accuracy, and long names: every number is drawn
    and no two texts overlap (labels go around the point, then to a column beside)."""
    from apportion_eval.report_figures import text_boxes, text_overlaps

    records = []
    for k in range(20):
        v = "baseline" if k == 0 else f"a-very-long-config-label-number-{k}-" + "x" * 30
        for i in range(10):
            records.append(
                {
                    "variant": v,
                    "benchmark": "niah",
                    "sample_id": str(i),
                    "length": 1000 * (1 + i % 2),
                    "depth": 0.5,
                    "score": float(i < 7),
                    "peak_kv_bytes": 2**20,
                }
            )
    figs = _figures(records)
    for name, fig in figs.items():
        assert text_overlaps(fig) == [], name
    drawn = {t for t, _ in text_boxes(figs["memory"])}
    numbers = sorted((t.get_text() for t in figs["memory"].axes[0].texts), key=int)
    assert numbers == [str(k) for k in range(1, 21)] and set(numbers) <= drawn


# ----------------------------------------------------------------------------- terminal
def test_terminal_shows_intervals_and_the_run_in_words():
    from apportion_eval.report import render_terminal
    from rich.console import Console

    out = io.StringIO()
    render_terminal(synthetic_records(), Console(file=out, width=160), "t", notes=["a note"])
    text = out.getvalue()
    assert re.search(r"\d+\.\d% \(\d+-\d+\)", text)
    for needle in (
        "in short",
        "Best per memory budget",
        "No better than the baseline",
        "#5 quest-0.5: 24 of 72 records are errors",
        "a note",
        "not told apart",
    ):
        assert needle in text, needle


def test_render_run_without_the_html(tmp_path):
    from apportion.config import parse_config
    from apportion.runner import RunResult
    from apportion_eval.report import render_run
    from rich.console import Console

    cfg = parse_config({"name": "t", "harness": {"report": False}})
    out = io.StringIO()
    run = RunResult(cfg, tmp_path, synthetic_records(samples=1), notes=["n1"])
    assert render_run(run, Console(file=out, width=160)) is None
    assert "in short" in out.getvalue() and "n1" in out.getvalue()
    assert not (tmp_path / "report.html").exists()


def test_report_command_on_synthetic_records(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [json.dumps(r) for r in synthetic_records(samples=1)]
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\nnot json\n")
    out = subprocess.run(
        [sys.executable, "-m", "apportion.cli", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    page = (run_dir / "report.html").read_text()
    assert "In short" in page and "not records and were left out" in page


# ----------------------------------------------------------------------------- in a browser
def _chromium():
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


def _browser_or_skip():
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: the report must be checked")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return browser


def _chromium_run(browser, args, timeout=180):
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
        ]
        return subprocess.run(
            [browser, *flags, *args], capture_output=True, text=True, timeout=timeout
        )


def _body_attr(dom, name):
    m = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    return None if m is None else m.group(1)


def test_report_html_renders_in_chromium_with_no_overlapping_text(tmp_path):
    from apportion_eval.report import write_report

    records = synthetic_records()
    path = write_report(records, tmp_path, title="synthetic", notes=["2 samples not run"])
    page = path.read_text()
    n_imgs = page.count("<img ")
    # accuracy chart, memory chart, length curves, one depth x length grid per benchmark
    assert n_imgs == 5
    top = page.index("id='in-short'")
    assert top < page.index("<img ") and page.index("2 samples not run") < top
    assert "94.4% <span class='ci'>(82-98)</span>" in page  # baseline, low diffusion
    browser = _browser_or_skip()
    for width in (1400, 820):
        dom = _chromium_run(browser, [f"--window-size={width},3000", "--dump-dom", path.as_uri()])
        assert _body_attr(dom.stdout, "data-images-decoded") == str(n_imgs), dom.stderr[-2000:]
        assert 'data-natural-width="0"' not in dom.stdout
        assert int(_body_attr(dom.stdout, "data-text-boxes")) > 500
        overlaps = _body_attr(dom.stdout, "data-text-overlaps")
        assert overlaps == "0", (width, _body_attr(dom.stdout, "data-text-overlap-first"))
        legend = re.search(r'<table class="legend" id="memory-legend">(.*?)</table>', dom.stdout)
        assert legend is not None
        for k, (label, *_rest) in enumerate(CONFIGS, 1):
            assert re.search(rf">{k}</span></td><td class=\"name\">{re.escape(label)}<", legend[1])
    shot = tmp_path / "shot.png"
    _chromium_run(browser, [f"--screenshot={shot}", "--window-size=1400,2000", path.as_uri()])
    assert shot.is_file() and shot.stat().st_size > 50_000


def test_the_overlap_check_sees_overlapping_text(tmp_path):
    """The page's own check, on a page where two labels are drawn on top of each other."""
    from apportion_eval.report import _CHECK

    page = tmp_path / "overlap.html"
    page.write_text(
        "<html><body><span style='position:absolute;left:10px;top:10px'>first label</span>"
        "<span style='position:absolute;left:30px;top:12px'>second label</span>"
        f"<p style='margin-top:120px'>apart</p>{_CHECK}</body></html>"
    )
    dom = _chromium_run(_browser_or_skip(), ["--dump-dom", page.as_uri()])
    assert _body_attr(dom.stdout, "data-text-overlaps") == "1", dom.stderr[-2000:]
    assert "first label" in _body_attr(dom.stdout, "data-text-overlap-first")


def test_write_report_leaves_no_temporary_file(tmp_path):
    from apportion_eval.report import write_report

    write_report(synthetic_records(samples=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_odd_runs_render(tmp_path):
    """No records; one record; a config whose every record errored; no depths, no tags."""
    from apportion_eval.report import render_html, render_terminal
    from rich.console import Console

    assert "No records." in render_html([])
    one = synthetic_records(samples=1)[:1]
    broken = [
        {
            "variant": "broken",
            "benchmark": "vt",
            "sample_id": str(i),
            "length": 512,
            "score": 0.0,
            "error": "RuntimeError: boom",
            "error_kind": "exception",
        }
        for i in range(3)
    ]
    plain = [
        {
            "variant": "baseline",
            "benchmark": "vt",
            "sample_id": str(i),
            "length": 512,
            "score": 1.0,
            "peak_kv_bytes": 2**20,
            "prediction": "x",
        }
        for i in range(3)
    ]
    for records in (one, plain + broken, broken):
        page = render_html(records, "odd")
        assert "In short" in page
        render_terminal(records, Console(file=io.StringIO(), width=120))
    page = render_html(plain + broken, "odd")
    assert "#2 broken: 3 of 3 records are errors (3 exception)" in page
    assert "No config has a measured peak KV" in render_html(broken)


def test_resident_kv_is_shown_beside_peak_kv():
    from apportion_eval.report_data import summary_rows

    records = synthetic_records(samples=1)
    offloaded = [
        dict(r, peak_resident_kv_bytes=r["peak_kv_bytes"] // 4) if "peak_kv_bytes" in r else r
        for r in records
    ]
    for rows, share in ((summary_rows(records), 1.0), (summary_rows(offloaded), 0.25)):
        measured = [r for r in rows if r["peak_kv_mib"] == r["peak_kv_mib"]]  # not NaN
        assert measured
        for r in measured:
            assert r["peak_resident_kv_mib"] == pytest.approx(share * r["peak_kv_mib"], rel=1e-3)
