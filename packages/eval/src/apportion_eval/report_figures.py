"""The figures of the run report (matplotlib, Agg; no pyplot state).

Every config keeps one number (``#k``, the baseline is ``#1``) and one colour across all
figures, and the HTML legend beside each figure names them, so no figure needs a long label
that could collide with another. Where labels sit at data points (the accuracy-vs-peak-KV
plot), :func:`place_labels` puts each number on its marker or, if that spot is taken, on the
nearest free spot around it with a leader line, checking every candidate box against the
boxes already placed and the figure's own texts. :func:`text_overlaps` finds any two texts of
a drawn figure whose boxes overlap; the tests require it to find none in every figure.
Error bars are 95% Wilson intervals (:mod:`apportion.stats`).
"""

from __future__ import annotations

import base64
import io
import math
import struct
from collections import defaultdict
from typing import Any

from apportion_eval.report_data import (
    Acc,
    finite,
    score,
    summary_rows,
    variants_of,
)

DPI = 144  # pixels per inch of the PNGs; shown at 96 per inch, so they stay sharp on HiDPI
SHOWN_DPI = 96
#: colours of configs #2, #3, ...; the baseline (#1) is drawn in near-black
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#9edae5",
    "#dbdb8d",
]
BASELINE_COLOUR = "#222222"
FRONT_COLOUR = "#c0392b"


def colours(variants: list[str]) -> dict[str, str]:
    return {
        v: BASELINE_COLOUR if i == 0 else PALETTE[(i - 1) % len(PALETTE)]
        for i, v in enumerate(variants)
    }


def short_length(n: int) -> str:
    """``4K`` for 4096, ``192`` for 192."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(chars - 1, 1)] + "\u2026"


# ----------------------------------------------------------------------------- plumbing
def figure(width: float, height: float, layout: str | None = None) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any) -> tuple[str, int, int]:
    """(base64 PNG, width, height) of ``fig``, width and height in CSS pixels."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    data = buf.getvalue()
    w, h = struct.unpack(">II", data[16:24])
    scale = SHOWN_DPI / DPI
    return base64.b64encode(data).decode("ascii"), round(w * scale), round(h * scale)


def _tick_labels(fig: Any) -> list[Any]:
    """The tick labels matplotlib draws (ticks inside each axis' view interval)."""
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, abs(lo), abs(hi))
            locs = set()
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                loc = tick.get_loc()
                if loc is None or not lo - eps <= loc <= hi + eps or loc in locs:
                    continue
                locs.add(loc)
                out += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    return out


def text_boxes(fig: Any) -> list[tuple[str, Any]]:
    """(text, display-space box) of every visible, non-empty text the figure draws, with the
    box drawn around it if any."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = _tick_labels(fig)
    every_tick = {
        id(t)
        for ax in fig.axes
        for axis in (ax.xaxis, ax.yaxis)
        for tick in [*axis.majorTicks, *axis.minorTicks]
        for t in (tick.label1, tick.label2)
    }
    texts = [t for t in fig.findobj(Text) if id(t) not in every_tick] + ticks
    out = []
    for t in texts:
        if not t.get_visible() or not t.get_text().strip():
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        box = Text.get_window_extent(t, renderer)  # an annotation's own: without its arrow
        patch = t.get_bbox_patch()
        if patch is not None:
            box = Bbox.union([box, patch.get_window_extent(renderer)])
        if box.width > 0 and box.height > 0:
            out.append((t.get_text(), box))
    return out


def _overlap(a: Any, b: Any, tol: float = 0.5) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def text_overlaps(fig: Any) -> list[tuple[str, str]]:
    """The pairs of texts of ``fig`` whose boxes overlap (empty for a legible figure)."""
    boxes = text_boxes(fig)
    return [
        (ta, tb) for i, (ta, a) in enumerate(boxes) for tb, b in boxes[i + 1 :] if _overlap(a, b)
    ]


# ----------------------------------------------------------------------------- label placement
def _candidates(step: float, rings: int = 14, per_ring: int = 16) -> list[tuple[float, float]]:
    """Offsets in display pixels: the spot itself, then rings of growing radius."""
    out = [(0.0, 0.0)]
    for ring in range(1, rings + 1):
        n = per_ring if ring > 1 else 8
        for j in range(n):
            # right, up-right, up, ... starting at the right (reads best next to a point)
            a = 2 * math.pi * j / n
            out.append((ring * step * math.cos(a), ring * step * math.sin(a)))
    return out


def place_labels(
    ax: Any, points: list[tuple[float, float, str]], disc: float, pad: float = 3.0
) -> list[tuple[float, float]]:
    """Display-pixel offsets, one per ``(x, y, text)`` data point, that keep every label's
    box clear of the others' and of the figure's texts (axis labels, ticks, title).

    The axis limits must be final. Labels are tried in order: on the point first (where the
    label's marker, ``disc`` pixels wide, must be clear), then on rings around it inside the
    axes; a label that finds no free spot there goes to a column right of the axes, below the
    labels already in it, which is free by construction (nothing else is drawn there)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = [b for _, b in text_boxes(fig)]
    frame = ax.get_window_extent(renderer)
    probe = fig.text(0, 0, "", fontsize=8, fontweight="bold")
    offsets = []
    column_y = frame.y1
    for x, y, text in points:
        probe.set_text(text)
        size = probe.get_window_extent(renderer)
        w, h = size.width + 2 * pad, size.height + 2 * pad
        px, py = ax.transData.transform((x, y))
        chosen = None
        for dx, dy in _candidates(max(w, h, disc * 0.75)):
            bw, bh = (max(w, disc), max(h, disc)) if dx == dy == 0 else (w, h)
            box = Bbox.from_bounds(px + dx - bw / 2, py + dy - bh / 2, bw, bh)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1
            inside = inside and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(_overlap(box, t, 0) for t in taken):
                chosen = (dx, dy, box)
                break
        if chosen is None:
            cx, cy = frame.x1 + 8 + w / 2, column_y - 2 - h / 2
            box = Bbox.from_bounds(cx - w / 2, cy - h / 2, w, h)
            column_y = box.y0
            chosen = (cx - px, cy - py, box)
        taken.append(chosen[2])
        offsets.append((chosen[0], chosen[1]))
    probe.remove()
    return offsets


# ----------------------------------------------------------------------------- figures
def _baseline_band(ax: Any, base: Acc, vertical: bool) -> None:
    if base.n == 0:
        return
    span = ax.axvspan if vertical else ax.axhspan
    line = ax.axvline if vertical else ax.axhline
    span(100 * base.low, 100 * base.high, color="#888888", alpha=0.14, lw=0, zorder=0)
    line(100 * base.mean, color="#555555", lw=0.8, ls="--", zorder=1)


def accuracy_chart(rows: list[dict[str, Any]], cols: dict[str, str]) -> Any:
    """Horizontal points with 95% error bars, one row per config (the baseline on top), the
    baseline's interval shaded; the interval and the verdict written at each row's end."""
    n = len(rows)
    fig = figure(8.6, 0.9 + 0.34 * n, layout="constrained")
    ax = fig.subplots()
    _baseline_band(ax, rows[0]["acc"], vertical=True)
    for i, r in enumerate(rows):
        acc = r["acc"]
        if acc.n == 0:
            continue
        c = cols[r["variant"]]
        ax.errorbar(
            [100 * acc.mean],
            [i],
            xerr=[[100 * (acc.mean - acc.low)], [100 * (acc.high - acc.mean)]],
            fmt="o",
            color=c,
            ecolor=c,
            elinewidth=2.2,
            capsize=4,
            ms=7,
            zorder=3,
        )
        verdict = "" if i == 0 else f"  {r['vs_baseline']}"
        ax.annotate(
            acc.text() + verdict,
            (1.0, i),
            xycoords=("axes fraction", "data"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="#b00020" if r["vs_baseline"] == "worse" else "#222222",
        )
    ax.set_yticks(range(n), [clip(f"#{r['k']} {r['variant']}", 34) for r in rows], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(-2, 102)
    ax.set_xlabel("accuracy (%), bars: 95% Wilson interval; shaded: the baseline's", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def memory_chart(
    rows: list[dict[str, Any]], cols: dict[str, str]
) -> tuple[Any, list[dict[str, Any]]] | None:
    """Accuracy (with 95% bars) against mean peak KV MiB, one numbered marker per config and
    the Pareto front of the means as a red step line. Returns the figure and the configs it
    shows (for the legend beside it)."""
    from matplotlib.colors import to_rgba

    pts = [r for r in rows if finite(r["peak_kv_mib"]) and r["acc"].n]
    if not pts:
        return None
    fig = figure(7.2, 4.8)
    fig.subplots_adjust(left=0.1, right=0.86, bottom=0.12, top=0.93)
    ax = fig.subplots()
    xs = [r["peak_kv_mib"] for r in pts]
    lo, hi = min(xs), max(xs)
    if lo > 0 and hi / lo > 20:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.5, hi * 1.5)
    else:
        pad = (hi - lo) * 0.08 or max(abs(hi) * 0.15, 0.5)
        ax.set_xlim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ax.set_ylim(-4, 104)
    _baseline_band(ax, rows[0]["acc"], vertical=False)
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["peak_kv_mib"])
    if front:
        fx = [r["peak_kv_mib"] for r in front] + [ax.get_xlim()[1]]
        fy = [100 * r["accuracy"] for r in front] + [100 * front[-1]["accuracy"]]
        ax.step(fx, fy, where="post", color=FRONT_COLOUR, lw=1.4, alpha=0.85, zorder=2)
    for r in pts:
        acc, c = r["acc"], cols[r["variant"]]
        ax.errorbar(
            [r["peak_kv_mib"]],
            [100 * acc.mean],
            yerr=[[100 * (acc.mean - acc.low)], [100 * (acc.high - acc.mean)]],
            fmt="none",
            ecolor=c,
            elinewidth=1.3,
            capsize=3,
            alpha=0.75,
            zorder=2.5,
        )
    ax.set_xlabel("mean peak KV cache (MiB)", fontsize=9)
    ax.set_ylabel("accuracy (%)", fontsize=9)
    ax.set_title(
        "numbers: configs (legend beside); red: Pareto front; bars: 95% intervals",
        fontsize=8,
        loc="left",
    )
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    # the front first, so its labels get the spots on their own markers
    order = sorted(pts, key=lambda r: (not r.get("pareto"), r["k"]))
    disc_pt = 15.0
    to_pt = 72 / DPI
    labels = [(r["peak_kv_mib"], 100 * r["accuracy"], str(r["k"])) for r in order]
    offsets = place_labels(ax, labels, disc=(disc_pt + 2) / to_pt)
    discs = {
        (r["peak_kv_mib"], r["accuracy"])
        for r, o in zip(order, offsets, strict=True)
        if o == (0, 0)
    }
    for r, (dx, dy) in zip(order, offsets, strict=True):
        c, xy = cols[r["variant"]], (r["peak_kv_mib"], 100 * r["accuracy"])
        on_marker = dx == 0 and dy == 0
        ring = FRONT_COLOUR if r.get("pareto") else "white"
        size = disc_pt if on_marker else 5
        ax.plot(*xy, "o", ms=size, color=c, mec=ring, mew=1.6, zorder=4 if on_marker else 3.5)
        rgba = to_rgba(c)
        if on_marker:
            ink = _cell_text_colour(rgba)
        else:  # light colours darkened, so that the number reads on white
            light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.6
            ink = (rgba[0] * 0.55, rgba[1] * 0.55, rgba[2] * 0.55, 1.0) if light else c
        # a leader line stops at the rim of a numbered disc it points into
        stop = disc_pt / 2 + 1 if (r["peak_kv_mib"], r["accuracy"]) in discs else 3
        ax.annotate(
            str(r["k"]),
            xy,
            xytext=(dx * to_pt, dy * to_pt),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=8,
            fontweight="bold",
            color=ink,
            zorder=5,
            annotation_clip=False,
            bbox=None
            if on_marker
            else {"boxstyle": "round,pad=0.12", "fc": "white", "ec": c, "lw": 0.8},
            arrowprops=None
            if on_marker
            else {"arrowstyle": "-", "color": c, "lw": 0.7, "shrinkA": 0, "shrinkB": stop},
        )
    return fig, pts


def length_chart(records: list[dict[str, Any]], cols: dict[str, str]) -> Any | None:
    """Accuracy vs length, one panel per benchmark, one line per config with 95% error bars
    (dodged sideways so that bars of one length do not hide each other)."""
    rows = summary_rows(records)
    benches = sorted({r["benchmark"] for r in rows})
    if not benches:
        return None
    variants = variants_of(records)
    number = {v: i for i, v in enumerate(variants, 1)}
    ncols = min(2, len(benches))
    nrows = math.ceil(len(benches) / ncols)
    legend_w = 2.6
    fig = figure(5.0 * ncols + legend_w, 3.3 * nrows + 0.3, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    handles: dict[str, Any] = {}
    for k, bench in enumerate(benches):
        ax = axes[k // ncols][k % ncols]
        brows = [r for r in rows if r["benchmark"] == bench]
        lengths = sorted({r["length"] for r in brows})
        pos = {n: i for i, n in enumerate(lengths)}
        vs = [v for v in variants if any(r["variant"] == v for r in brows)]
        width = min(0.6, 0.08 * len(vs))
        for j, v in enumerate(vs):
            shift = (j - (len(vs) - 1) / 2) * (width / max(len(vs) - 1, 1))
            pts = sorted((r["length"], r["acc"]) for r in brows if r["variant"] == v)
            x = [pos[n] + shift for n, _ in pts]
            y = [100 * a.mean for _, a in pts]
            err = [
                [100 * (a.mean - a.low) for _, a in pts],
                [100 * (a.high - a.mean) for _, a in pts],
            ]
            h = ax.errorbar(
                x,
                y,
                yerr=err,
                fmt="-o",
                color=cols[v],
                ms=4,
                lw=1.4,
                elinewidth=1.0,
                capsize=2,
                alpha=0.9,
            )
            handles.setdefault(v, h)
        ax.set_xticks(range(len(lengths)), [short_length(n) for n in lengths], fontsize=8)
        ax.set_xlim(-0.6, len(lengths) - 0.4)
        ax.set_ylim(-4, 104)
        ax.set_title(clip(bench, 60), fontsize=9)
        ax.set_xlabel("length (tokens)", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(benches), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.legend(
        [handles[v] for v in variants if v in handles],
        [clip(f"#{number[v]} {v}", 30) for v in variants if v in handles],
        loc="outside right upper",
        fontsize=7.5,
        frameon=False,
    )
    return fig


def _cell_text_colour(rgba: tuple[float, ...]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def depth_grids(records: list[dict[str, Any]], cols: dict[str, str]) -> list[tuple[str, Any]]:
    """(benchmark, figure) for every benchmark whose samples have a depth: one depth x length
    heatmap per config with every measured depth and length, each cell its accuracy and n."""
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"]
    variants = variants_of(records)
    number = {v: i for i, v in enumerate(variants, 1)}
    out = []
    benches = sorted({r["benchmark"] for r in records if r.get("depth") is not None})
    for bench in benches:
        rs = [r for r in records if r["benchmark"] == bench and r.get("depth") is not None]
        depths = sorted({float(r["depth"]) for r in rs})
        lengths = sorted({int(r.get("length") or 0) for r in rs})
        cells: dict[tuple[str, float, int], list[float]] = defaultdict(list)
        errs: dict[tuple[str, float, int], int] = defaultdict(int)
        for r in rs:
            key = (r["variant"], float(r["depth"]), int(r.get("length") or 0))
            cells[key].append(score(r))
            errs[key] += "error" in r
        vs = [v for v in variants if any(key[0] == v for key in cells)]
        cell_w, cell_h = 0.7, 0.58 if any(errs.values()) else 0.46
        panel_w = max(2.5, cell_w * len(lengths) + 0.9)
        panel_h = cell_h * len(depths) + 0.95
        ncols = max(1, min(len(vs), int(11.5 // panel_w)))
        nrows = math.ceil(len(vs) / ncols)
        fig = figure(panel_w * ncols + 1.0, panel_h * nrows + 0.2, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        image = None
        title_chars = int(panel_w * 72 / (8 * 0.62))
        for k, v in enumerate(vs):
            ax = axes[k // ncols][k % ncols]
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    xs = cells.get((v, d, n))
                    if xs:
                        grid[i][j] = sum(xs) / len(xs)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
            ax.set_facecolor("#e6e6e6")
            ax.set_xticks(range(len(lengths)), [short_length(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.tick_params(length=2, pad=2)
            ax.set_title(clip(f"#{number[v]} {v}", title_chars), fontsize=8, color=cols[v])
            if k // ncols == nrows - 1 or k + ncols >= len(vs):
                ax.set_xlabel("length (tokens)", fontsize=7)
            if k % ncols == 0:
                ax.set_ylabel("depth", fontsize=7)
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    xs = cells.get((v, d, n))
                    if not xs:
                        ax.text(j, i, "-", ha="center", va="center", fontsize=7, color="#666")
                        continue
                    acc = grid[i][j]
                    e = errs[(v, d, n)]
                    ax.text(
                        j,
                        i,
                        f"{100 * acc:.0f}%\nn={len(xs)}" + (f"\n{e} err" if e else ""),
                        ha="center",
                        va="center",
                        fontsize=7.5,
                        linespacing=1.1,
                        color=_cell_text_colour(cmap(acc)),
                    )
        for k in range(len(vs), nrows * ncols):
            axes[k // ncols][k % ncols].set_visible(False)
        if image is not None:
            bar = fig.colorbar(image, ax=axes, shrink=min(0.9, 3.0 / max(panel_h * nrows, 1)))
            bar.set_label("accuracy", fontsize=7)
            bar.ax.tick_params(labelsize=7)
        out.append((bench, fig))
    return out
