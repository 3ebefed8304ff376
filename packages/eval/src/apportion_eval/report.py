"""Reports of a run: the terminal table and a self-contained ``report.html``.

The HTML embeds its figures as base64 PNGs (matplotlib, Agg), so the file can be mailed or
attached to a CI run as is. Figures: a depth x length heatmap per config and benchmark,
accuracy-vs-length curves per benchmark, and accuracy against peak KV memory with the Pareto
front (no other config is both more accurate and smaller) marked. Tables: the summary per
config x benchmark x length, accuracy grouped by the diffusion/scope tags, errors, and the
answers that missed, so a low score can be read rather than guessed at.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPORT = "report.html"


# ----------------------------------------------------------------------------- aggregation
def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, benchmark, length): n, errors, accuracy and mean costs of the ok samples."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["variant"], r["benchmark"], int(r.get("length") or 0))].append(r)
    rows = []
    for (variant, bench, length), rs in sorted(
        groups.items(), key=lambda kv: (_order(records, kv[0][0]), kv[0][1], kv[0][2])
    ):
        ok = [r for r in rs if "error" not in r]
        rows.append(
            {
                "variant": variant,
                "benchmark": bench,
                "length": length,
                "n": len(rs),
                "errors": len(rs) - len(ok),
                "accuracy": _mean(float(r.get("score", 0.0)) for r in rs),
                "peak_kv_mib": _mean(r["peak_kv_bytes"] / 2**20 for r in ok),
                "prefill_seconds": _mean(r["prefill_seconds"] for r in ok),
                "decode_tokens_per_s": _mean(r["decode_tokens_per_s"] for r in ok),
                "prompt_tokens": _mean(r["prompt_tokens"] for r in ok),
                "context_chars": _mean(r.get("context_chars", 0) for r in rs),
            }
        )
    return rows


def _order(records: list[dict[str, Any]], variant: str) -> int:
    """Variants in order of first appearance (the baseline first)."""
    for i, r in enumerate(records):
        if r["variant"] == variant:
            return i
    return len(records)


def variants_of(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["variant"], None)
    return list(seen)


def tag_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per variant and (diffusion, scope) tag pair."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        tags = r.get("tags") or {}
        groups[(r["variant"], tags.get("diffusion", "?"), tags.get("scope", "?"))].append(
            float(r.get("score", 0))
        )
    order = {v: i for i, v in enumerate(variants_of(records))}
    return [
        {"variant": v, "diffusion": d, "scope": s, "n": len(xs), "accuracy": _mean(xs)}
        for (v, d, s), xs in sorted(
            groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])
        )
    ]


def memory_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per variant: mean accuracy and mean peak KV MiB over its ok samples."""
    out = []
    for v in variants_of(records):
        rs = [r for r in records if r["variant"] == v]
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        out.append(
            {
                "variant": v,
                "accuracy": _mean(float(r.get("score", 0)) for r in rs),
                "peak_kv_mib": _mean(r["peak_kv_bytes"] / 2**20 for r in ok),
                "n": len(rs),
            }
        )
    return out


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point dominates (at most the memory and at least the accuracy, one
    of them strictly), sorted by memory."""
    front = []
    for p in points:
        dominated = any(
            q["peak_kv_mib"] <= p["peak_kv_mib"]
            and q["accuracy"] >= p["accuracy"]
            and (q["peak_kv_mib"] < p["peak_kv_mib"] or q["accuracy"] > p["accuracy"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["peak_kv_mib"])


# ----------------------------------------------------------------------------- terminal
def render_terminal(
    records: list[dict[str, Any]], console: Any, title: str = "apportion run"
) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "config",
        "benchmark",
        "length",
        "n",
        "err",
        "accuracy",
        "peak KV MiB",
        "prefill s",
        "decode tok/s",
    ):
        table.add_column(col, justify="left" if col in {"config", "benchmark"} else "right")
    last = None
    for r in summary_rows(records):
        if last is not None and r["variant"] != last:
            table.add_section()
        last = r["variant"]
        table.add_row(
            r["variant"],
            r["benchmark"],
            str(r["length"]),
            str(r["n"]),
            f"[red]{r['errors']}[/red]" if r["errors"] else "0",
            f"{100 * r['accuracy']:.1f}%",
            _fmt(r["peak_kv_mib"], 2),
            _fmt(r["prefill_seconds"], 3),
            _fmt(r["decode_tokens_per_s"], 1),
        )
    console.print(table)
    tags = Table(title="accuracy by tag (diffusion / scope)")
    for col in ("config", "diffusion", "scope", "n", "accuracy"):
        tags.add_column(col, justify="left" if col in {"config", "diffusion", "scope"} else "right")
    for r in tag_rows(records):
        tags.add_row(
            r["variant"], r["diffusion"], r["scope"], str(r["n"]), f"{100 * r['accuracy']:.1f}%"
        )
    console.print(tags)
    errors = [r for r in records if "error" in r]
    if errors:
        first: dict[str, str] = {}
        for r in errors:
            first.setdefault(r["variant"], r["error"])
        for v, e in first.items():
            n = sum(r["variant"] == v for r in errors)
            console.print(f"[red]{v}: {n} errors[/red], first: {e[:200]}", highlight=False)


def _fmt(x: float, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- figures
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def heatmaps(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(caption, png) per benchmark with depths: one depth x length panel per config."""
    out = []
    benches = sorted({r["benchmark"] for r in records if r.get("depth") is not None})
    variants = variants_of(records)
    for bench in benches:
        rs = [r for r in records if r["benchmark"] == bench and r.get("depth") is not None]
        depths = sorted({float(r["depth"]) for r in rs})
        lengths = sorted({int(r["length"]) for r in rs})
        vs = [v for v in variants if any(r["variant"] == v for r in rs)]
        cols = min(4, len(vs))
        rows = math.ceil(len(vs) / cols)
        fig = _figure(3.2 * cols + 0.8, 2.6 * rows + 0.4)
        axes = fig.subplots(rows, cols, squeeze=False)
        image = None
        for k, v in enumerate(vs):
            ax = axes[k // cols][k % cols]
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    cell = [
                        float(r.get("score", 0))
                        for r in rs
                        if r["variant"] == v and float(r["depth"]) == d and int(r["length"]) == n
                    ]
                    if cell:
                        grid[i][j] = _mean(cell)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(v[:40], fontsize=8)
            ax.set_xlabel("length (tokens)", fontsize=7)
            ax.set_ylabel("depth", fontsize=7)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i][j]):
                        ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
        for k in range(len(vs), rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
        out.append((f"{bench}: accuracy by depth x length", _png(fig)))
    return out


def length_curves(records: list[dict[str, Any]]) -> tuple[str, str] | None:
    benches = sorted({r["benchmark"] for r in records})
    if not benches:
        return None
    rows = summary_rows(records)
    cols = min(3, len(benches))
    nrows = math.ceil(len(benches) / cols)
    fig = _figure(4.6 * cols + 2.5, 3.2 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for k, bench in enumerate(benches):
        ax = axes[k // cols][k % cols]
        for v in variants_of(records):
            pts = sorted(
                (r["length"], r["accuracy"])
                for r in rows
                if r["benchmark"] == bench and r["variant"] == v
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v[:40])
        ax.set_title(bench, fontsize=9)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for k in range(len(benches), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return ("accuracy vs length", _png(fig))


def memory_plot(records: list[dict[str, Any]]) -> tuple[str, str] | None:
    points = memory_points(records)
    if not points:
        return None
    front = pareto_front(points)
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    on_front = {p["variant"] for p in front}
    for p in points:
        ax.scatter(
            p["peak_kv_mib"],
            p["accuracy"],
            s=60 if p["variant"] in on_front else 30,
            color="tab:red" if p["variant"] in on_front else "tab:blue",
            zorder=3,
        )
        ax.annotate(
            p["variant"][:32],
            (p["peak_kv_mib"], p["accuracy"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.step(
        [p["peak_kv_mib"] for p in front],
        [p["accuracy"] for p in front],
        where="post",
        color="tab:red",
        label="Pareto front",
        zorder=2,
    )
    ax.set_xlabel("mean peak KV cache (MiB)")
    ax.set_ylabel("mean accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ("accuracy vs peak KV memory (red: Pareto front)", _png(fig))


# ----------------------------------------------------------------------------- html
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.num{text-align:right}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-weight:600;margin-bottom:.4em}.err{color:#b00}pre{white-space:pre-wrap;font-size:12px}"""


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in cols)
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if fmt == "%":
                cells.append(f'<td class="num">{100 * v:.1f}%</td>')
            elif fmt:
                cells.append(f'<td class="num">{_fmt(v, int(fmt))}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(
    records: list[dict[str, Any]], title: str = "apportion run", notes: list[str] | None = None
) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    variants = variants_of(records)
    benches = sorted({r["benchmark"] for r in records})
    parts.append(
        f"<p>{len(records)} records; {len(variants)} configs; benchmarks: "
        f"{html.escape(', '.join(benches))}.</p>"
    )
    for note in notes or []:
        parts.append(f"<p class='err'>{html.escape(note)}</p>")
    figs = heatmaps(records)
    for extra in (length_curves(records), memory_plot(records)):
        if extra:
            figs.append(extra)
    for caption, png in figs:
        parts.append(
            f"<figure><figcaption>{html.escape(caption)}</figcaption>"
            f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'></figure>"
        )
    parts.append("<h2>Summary</h2>")
    parts.append(
        _table(
            summary_rows(records),
            [
                ("variant", "config", ""),
                ("benchmark", "benchmark", ""),
                ("length", "length (tokens)", ""),
                ("context_chars", "context (chars)", "0"),
                ("n", "n", ""),
                ("errors", "errors", ""),
                ("accuracy", "accuracy", "%"),
                ("peak_kv_mib", "peak KV MiB", "2"),
                ("prefill_seconds", "prefill s", "3"),
                ("decode_tokens_per_s", "decode tok/s", "1"),
                ("prompt_tokens", "prompt tokens", "0"),
            ],
        )
    )
    parts.append("<h2>By tag (diffusion / scope)</h2>")
    parts.append(
        _table(
            tag_rows(records),
            [
                ("variant", "config", ""),
                ("diffusion", "diffusion", ""),
                ("scope", "scope", ""),
                ("n", "n", ""),
                ("accuracy", "accuracy", "%"),
            ],
        )
    )
    pts = memory_points(records)
    if pts:
        front = {p["variant"] for p in pareto_front(pts)}
        for p in pts:
            p["pareto"] = "yes" if p["variant"] in front else ""
        parts.append("<h2>Accuracy vs memory</h2>")
        parts.append(
            _table(
                pts,
                [
                    ("variant", "config", ""),
                    ("n", "n", ""),
                    ("accuracy", "accuracy", "%"),
                    ("peak_kv_mib", "peak KV MiB", "2"),
                    ("pareto", "Pareto front", ""),
                ],
            )
        )
    errors = [r for r in records if "error" in r]
    if errors:
        parts.append("<h2>Errors</h2>")
        parts.append(
            _table(
                errors[:50],
                [
                    ("variant", "config", ""),
                    ("benchmark", "benchmark", ""),
                    ("sample_id", "sample", ""),
                    ("error", "error", ""),
                ],
            )
        )
    misses = [r for r in records if "error" not in r and float(r.get("score", 0)) < 1.0]
    if misses:
        parts.append(f"<h2>Missed answers ({len(misses)}; first 40)</h2>")
        rows = [
            {
                **r,
                "gold": json.dumps(r.get("answers"))[:200],
                "said": (r.get("prediction") or "")[:300],
            }
            for r in misses[:40]
        ]
        parts.append(
            _table(
                rows,
                [
                    ("variant", "config", ""),
                    ("sample_id", "sample", ""),
                    ("score", "score", "2"),
                    ("gold", "gold", ""),
                    ("said", "prediction", ""),
                ],
            )
        )
    # lets a headless browser (and the tests) confirm every figure decoded
    parts.append(
        "<script>window.addEventListener('load',()=>{let ok=0;"
        "document.querySelectorAll('img').forEach(i=>{i.setAttribute('data-natural-width',"
        "i.naturalWidth);if(i.naturalWidth>0)ok++;});"
        "document.body.setAttribute('data-images-decoded',ok);});</script>"
    )
    parts.append("</body></html>")
    return "".join(parts)


def write_report(
    records: list[dict[str, Any]],
    run_dir: str | Path,
    title: str = "apportion run",
    notes: list[str] | None = None,
) -> Path:
    """Write ``RUN_DIR/report.html`` atomically and return its path."""
    path = Path(run_dir) / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    tmp.write_text(render_html(records, title, notes), encoding="utf-8")
    os.replace(tmp, path)
    return path
