"""Reports of a run: the terminal tables and a self-contained ``report.html``.

:func:`render_run` is what ``apportion run`` calls through the ``apportion_report`` hook
once the core's run loop has finished: it prints the tables and writes
``RUN_DIR/report.html`` (atomically), with the run's notes (variants left out, samples not
run) at the top. ``apportion report RUN_DIR`` renders the same from the records alone.

Every accuracy carries its 95% Wilson interval (``94.4% (81-99)``), in the tables and as
error bars, and a difference inside the intervals is never called a win
(:mod:`apportion_eval.report_data`). The HTML opens with the run in words: the best config
per memory budget along the Pareto front, the configs no better than the baseline (the
first config), the errors per config and the run's notes. Then: accuracy per config (table
and chart), accuracy against peak KV memory with the Pareto front (numbered markers, the
legend beside), accuracy per benchmark, accuracy vs length per benchmark, the depth x
length grid of every config and benchmark with n per cell, accuracy by the diffusion and
scope tags, the full summary, errors, and the answers that missed. Figures are base64 PNGs
(matplotlib, Agg; :mod:`apportion_eval.report_figures`), so the file can be mailed or
attached to a CI run as is.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from apportion.host.io import atomic_write

from apportion_eval.report_data import (
    BETTER,
    TIED,
    WORSE,
    Acc,
    Headline,
    config_rows,
    fmt_mib,
    headline,
    memory_points,
    pareto_front,
    pivot,
    summary_rows,
    tag_rows,
    tag_values,
    variants_of,
    verdict,
)

__all__ = [
    "REPORT",
    "memory_points",
    "pareto_front",
    "render_html",
    "render_run",
    "render_terminal",
    "summary_rows",
    "tag_rows",
    "variants_of",
    "write_report",
]

REPORT = "report.html"
TAGS = ("diffusion", "scope")


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- terminal
def render_terminal(
    records: list[dict[str, Any]],
    console: Any,
    title: str = "apportion run",
    notes: list[str] | None = None,
) -> None:
    """Print the summary per config x benchmark x length, accuracy by tag, the configs side
    by side, and the run in a few lines (best per memory budget, against the baseline,
    errors, ``notes``)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for col in (
        "config",
        "benchmark",
        "length",
        "n",
        "err",
        "accuracy (95%)",
        "peak KV MiB",
        "resident KV MiB",
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
            escape(r["variant"]),
            escape(r["benchmark"]),
            str(r["length"]),
            str(r["n"]),
            f"[red]{r['errors']}[/red]" if r["errors"] else "0",
            r["acc"].text(),
            _fmt(r["peak_kv_mib"], 2),
            _fmt(r["peak_resident_kv_mib"], 2),
            _fmt(r["prefill_seconds"], 3),
            _fmt(r["decode_tokens_per_s"], 1),
        )
    console.print(table)
    tags = Table(title="accuracy by tag (diffusion / scope)")
    for col in ("config", "diffusion", "scope", "n", "accuracy (95%)"):
        tags.add_column(col, justify="left" if col in {"config", "diffusion", "scope"} else "right")
    for r in tag_rows(records):
        tags.add_row(
            escape(r["variant"]),
            escape(r["diffusion"]),
            escape(r["scope"]),
            str(r["n"]),
            r["acc"].text(),
        )
    console.print(tags)
    rows = config_rows(records)
    configs = Table(title="configs (all benchmarks; #1 is the baseline)")
    for col in ("#", "config", "n", "err", "accuracy (95%)", "vs baseline", "peak KV MiB", "front"):
        configs.add_column(col, justify="left" if col in {"config", "vs baseline"} else "right")
    style = {WORSE: "[red]", BETTER: "[green]"}
    for r in rows:
        v = r["vs_baseline"]
        configs.add_row(
            str(r["k"]),
            escape(r["variant"]),
            str(r["n"]),
            f"[red]{r['errors']}[/red]" if r["errors"] else "0",
            r["acc"].text(),
            f"{style[v]}{v}[/]" if v in style else v,
            fmt_mib(r["peak_kv_mib"]),
            "yes" if r.get("pareto") else "",
        )
    console.print(configs)
    words = headline(records, rows)
    console.rule("[bold]in short[/bold]")
    for heading, lines in _sections(words, notes):
        console.print(f"[bold]{heading}[/bold]")
        for line in lines:
            console.print(f"  - {line}", markup=False, highlight=False)


def _sections(words: Headline, notes: list[str] | None) -> list[tuple[str, list[str]]]:
    out = [
        ("Best per memory budget", words.budgets),
        ("Against the baseline", words.baseline),
        ("Errors", words.errors),
    ]
    if words.measured:
        out.append(("How it was measured", words.measured))
    if notes:
        out.append(("Notes on this run", list(notes)))
    return out


# ----------------------------------------------------------------------------- html bits
_CSS = """
:root{--ink:#1d2330;--muted:#5f6b7a;--line:#dde2ea;--card:#fff;--bg:#f5f7fa;--bad:#b00020;
--good:#1b7f3b}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:var(--bg);color:var(--ink)}
main{max-width:1320px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 10px}
h3{font-size:14px;margin:14px 0 4px;color:var(--muted);text-transform:uppercase;
letter-spacing:.04em}
.meta{color:var(--muted);margin:0 0 18px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:18px 20px;margin:0 0 18px;overflow-x:auto}
section.short{border-left:5px solid #2f6fdf}
ul{margin:4px 0 0;padding-left:20px}li{margin:3px 0}
.notes{background:#fff6e0;border:1px solid #f1d48a;border-radius:8px;padding:8px 14px;
margin:0 0 18px}
.notes li{color:#6b4d00}
.fine{color:var(--muted);font-size:12.5px;margin:10px 0 0}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 7px;vertical-align:middle;
overflow-wrap:break-word}
td.name{white-space:nowrap}td.comp{font-size:12px;color:var(--muted);max-width:260px}
td.how{font-size:12px;max-width:110px}
td.pred,td.gold,td.error{overflow-wrap:anywhere}
th{background:#f0f3f7;text-align:left;font-weight:600}
tr:hover td{background:#fafbfd}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.acc{white-space:nowrap;font-variant-numeric:tabular-nums}
.ci{color:var(--muted);font-size:12px}
.worse{color:var(--bad);font-weight:600}.better{color:var(--good);font-weight:600}
.tied{color:var(--muted)}
.sw{display:inline-block;min-width:22px;padding:1px 5px;border-radius:11px;text-align:center;
font-weight:700;font-size:12px}
.bar{position:relative;width:120px;height:12px;background:#eef1f5;border-radius:6px}
.bar .base{position:absolute;top:0;bottom:0;background:rgba(0,0,0,.10)}
.bar .range{position:absolute;top:3px;height:6px;border-radius:3px}
.bar .mean{position:absolute;top:0;width:3px;height:12px;margin-left:-1px;border-radius:1px}
figure{margin:10px 0 16px}figcaption{font-weight:600;margin-bottom:6px}
img{max-width:100%;height:auto;display:block}
.with-legend{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.with-legend figure{margin:0;flex:0 1 auto}
table.legend{margin:0}
pre{white-space:pre-wrap;font-size:12px}
td.pred{max-width:460px}td.gold{max-width:240px}td.variant{white-space:nowrap}
details summary{cursor:pointer;color:var(--muted);margin:12px 0 4px}
"""

_CHECK = (
    # lets a headless browser (and the tests) confirm every figure decoded and that no two
    # texts of the page overlap: every text's line boxes, compared pairwise
    "<script>window.addEventListener('load',()=>{let ok=0;"
    "document.querySelectorAll('img').forEach(i=>{i.setAttribute('data-natural-width',"
    "i.naturalWidth);if(i.naturalWidth>0)ok++;});"
    "document.body.setAttribute('data-images-decoded',ok);"
    "const boxes=[],range=document.createRange(),"
    "walk=document.createTreeWalker(document.body,NodeFilter.SHOW_TEXT);"
    "for(let n=walk.nextNode();n;n=walk.nextNode()){"
    "const el=n.parentElement;if(!n.textContent.trim()||el.closest('script,style'))continue;"
    # text in a closed <details> is not shown (Chromium still lays it out, hidden)
    "if(el.closest('details:not([open])')&&!el.closest('summary'))continue;"
    "if(el.checkVisibility&&!el.checkVisibility())continue;"
    "range.selectNodeContents(n);"
    "for(const r of range.getClientRects())if(r.width>0.5&&r.height>0.5)"
    "boxes.push([r.left,r.top,r.right,r.bottom,n.textContent.trim().slice(0,40)]);}"
    "boxes.sort((a,b)=>a[1]-b[1]);let bad=0;const first=[];"
    "for(let i=0;i<boxes.length;i++){const a=boxes[i];"
    "for(let j=i+1;j<boxes.length&&boxes[j][1]<a[3]-1;j++){const b=boxes[j];"
    "if(Math.min(a[2],b[2])-Math.max(a[0],b[0])>1&&Math.min(a[3],b[3])-Math.max(a[1],b[1])>1)"
    "{bad++;if(first.length<5)first.push([a[4],b[4]]);}}}"
    "document.body.setAttribute('data-text-boxes',boxes.length);"
    "document.body.setAttribute('data-text-overlaps',bad);"
    "document.body.setAttribute('data-text-overlap-first',JSON.stringify(first));});</script>"
)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _ink(colour: str) -> str:
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def _swatch(k: int, colour: str) -> str:
    return f"<span class='sw' style='background:{colour};color:{_ink(colour)}'>{k}</span>"


def _tint(acc: Acc) -> str:
    if acc.n == 0:
        return ""
    return f" style='background:hsl({120 * acc.mean:.0f},60%,90%)'"


def _acc_cell(acc: Acc, mark: str = "") -> str:
    if acc.n == 0:
        return "<td class='acc'>-</td>"
    ci = f"({100 * acc.low:.0f}-{100 * acc.high:.0f})"
    return (
        f"<td class='acc'{_tint(acc)}>{100 * acc.mean:.1f}% <span class='ci'>{ci}</span>{mark}</td>"
    )


def _mark(v: str) -> str:
    """A marker of a verdict against the baseline (none when not told apart)."""
    if v == BETTER:
        return " <span class='better' title='interval above the baseline'>\u25b2</span>"
    if v == WORSE:
        return " <span class='worse' title='interval below the baseline'>\u25bc</span>"
    return ""


def _verdict_cell(v: str) -> str:
    cls = {BETTER: "better", WORSE: "worse", TIED: "tied"}.get(v, "")
    return f"<td class='{cls}'>{_e(v)}</td>"


def _bar(acc: Acc, base: Acc, colour: str) -> str:
    if acc.n == 0:
        return "<td></td>"
    b = (
        f"<span class='base' style='left:{100 * base.low:.1f}%;"
        f"width:{100 * (base.high - base.low):.1f}%'></span>"
        if base.n
        else ""
    )
    return (
        f"<td><div class='bar' title='{_e(acc.text())}'>{b}"
        f"<span class='range' style='left:{100 * acc.low:.1f}%;"
        f"width:{max(100 * (acc.high - acc.low), 0.5):.1f}%;background:{colour}'></span>"
        f"<span class='mean' style='left:{100 * acc.mean:.1f}%;background:{colour}'></span>"
        "</div></td>"
    )


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """A plain table: ``(key, title, fmt)`` with fmt ``acc`` (an :class:`Acc`), a digit count,
    or empty for text."""
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in cols)
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if fmt == "acc":
                cells.append(_acc_cell(v))
            elif fmt:
                cells.append(f"<td class='num'>{_fmt(v, int(fmt))}</td>")
            else:
                cls = f" class='{key}'" if key in {"pred", "gold", "error", "variant"} else ""
                cells.append(f"<td{cls}>{_e('' if v is None else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(caption: str, fig: Any) -> str:
    from apportion_eval.report_figures import png

    data, w, h = png(fig)
    return (
        f"<figure><figcaption>{_e(caption)}</figcaption><img alt='{_e(caption)}' width='{w}' "
        f"height='{h}' src='data:image/png;base64,{data}'></figure>"
    )


def _measured_how(r: dict[str, Any]) -> str:
    bits = []
    if r["shared_prefill"] > 1:
        bits.append(f"prefill shared by {r['shared_prefill']}")
    if r["batch_size"] > 1:
        bits.append(f"batch {r['batch_size']}")
    return ", ".join(bits) or "alone"


def _components(r: dict[str, Any], base: dict[str, Any]) -> str:
    """The components of a config; for any but the baseline, those that differ from its."""
    comps = r["components"]
    if r is not base:
        comps = {k: v for k, v in comps.items() if base["components"].get(k) != v}
        if not comps:
            return "as the baseline"
    return " \u00b7 ".join(f"{k}={v}" for k, v in sorted(comps.items()))


# ----------------------------------------------------------------------------- html sections
def _short(words: Headline) -> str:
    def ul(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"

    parts = [
        "<section class='short' id='in-short'><h2>In short</h2>",
        "<h3>Best per memory budget</h3>",
        ul(words.budgets),
        "<h3>Against the baseline</h3>",
        ul(words.baseline),
        "<h3>Errors</h3>",
        ul(words.errors),
    ]
    if words.measured:
        parts += ["<h3>How it was measured</h3>", ul(words.measured)]
    parts.append(
        "<p class='fine'>Accuracies are means over samples with 95% Wilson intervals in "
        "brackets. Two configs are told apart only when their intervals do not overlap; "
        "otherwise the difference may be noise and no winner is named. #1, the first config "
        "of the run, is the baseline. A record that errored scores 0 and counts as a miss. "
        "Peak KV is the mean over a config's samples that ran.</p></section>"
    )
    return "".join(parts)


def _configs(rows: list[dict[str, Any]], cols: dict[str, str]) -> str:
    from apportion_eval.report_figures import accuracy_chart

    base = rows[0]["acc"]
    head = (
        "<tr><th>#</th><th>config</th><th>accuracy (95%)</th><th>interval</th>"
        "<th>vs baseline</th><th>n</th><th>errors</th><th>peak KV MiB</th><th>Pareto</th>"
        "<th>prefill s</th><th>decode tok/s</th><th>measured</th>"
        "<th>components (#2 on: what differs from #1)</th></tr>"
    )
    body = "".join(
        "<tr>"
        f"<td>{_swatch(r['k'], cols[r['variant']])}</td><td class='name'>{_e(r['variant'])}</td>"
        f"{_acc_cell(r['acc'])}{_bar(r['acc'], base, cols[r['variant']])}"
        f"{_verdict_cell(r['vs_baseline'])}<td class='num'>{r['n']}</td>"
        f"<td class='num{' worse' if r['errors'] else ''}'>{r['errors']}</td>"
        f"<td class='num'>{fmt_mib(r['peak_kv_mib'])}</td>"
        f"<td>{'yes' if r.get('pareto') else ''}</td>"
        f"<td class='num'>{_fmt(r['prefill_seconds'], 3)}</td>"
        f"<td class='num'>{_fmt(r['decode_tokens_per_s'], 1)}</td>"
        f"<td class='how'>{_e(_measured_how(r))}</td>"
        f"<td class='comp'>{_e(_components(r, rows[0]))}</td></tr>"
        for r in rows
    )
    return (
        "<section id='configs'><h2>Accuracy per config</h2>"
        f"<table class='configs'>{head}{body}</table>"
        + _img("accuracy per config (all benchmarks), 95% intervals", accuracy_chart(rows, cols))
        + "</section>"
    )


def _memory(rows: list[dict[str, Any]], cols: dict[str, str]) -> str:
    from apportion_eval.report_figures import memory_chart

    drawn = memory_chart(rows, cols)
    if drawn is None:
        return ""
    fig, pts = drawn
    legend = "".join(
        f"<tr><td>{_swatch(r['k'], cols[r['variant']])}</td><td class='name'>{_e(r['variant'])}"
        f"</td>{_acc_cell(r['acc'])}<td class='num'>{fmt_mib(r['peak_kv_mib'])}</td>"
        f"<td>{'yes' if r.get('pareto') else ''}</td></tr>"
        for r in sorted(pts, key=lambda r: r["k"])
    )
    return (
        "<section id='memory'><h2>Accuracy vs peak KV memory</h2><div class='with-legend'>"
        + _img("accuracy vs mean peak KV (red: Pareto front of the means)", fig)
        + "<table class='legend' id='memory-legend'><tr><th>#</th><th>config</th>"
        "<th>accuracy (95%)</th><th>peak KV MiB</th><th>front</th></tr>"
        f"{legend}</table></div></section>"
    )


def _pivot_table(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    cols: dict[str, str],
    key: Any,
    columns: list[str] | None = None,
    heading: str = "",
) -> str:
    found, cells = pivot(records, key)
    columns = columns or sorted(found)
    base = rows[0]["variant"]
    head = f"<tr><th>#</th><th>config</th>{''.join(f'<th>{_e(c)}</th>' for c in columns)}</tr>"
    body = []
    for r in rows:
        tds = []
        for c in columns:
            acc = cells.get((r["variant"], c))
            if acc is None:
                tds.append("<td class='acc'>-</td>")
                continue
            b = cells.get((base, c))
            v = verdict(acc, b) if b is not None and r["variant"] != base else TIED
            tds.append(_acc_cell(acc, _mark(v) + f" <span class='ci'>n={acc.n}</span>"))
        body.append(
            f"<tr><td>{_swatch(r['k'], cols[r['variant']])}</td><td class='name'>"
            f"{_e(r['variant'])}</td>" + "".join(tds) + "</tr>"
        )
    cap = f"<h3>{_e(heading)}</h3>" if heading else ""
    return f"{cap}<table class='pivot'>{head}{''.join(body)}</table>"


def render_html(
    records: list[dict[str, Any]], title: str = "apportion run", notes: list[str] | None = None
) -> str:
    from apportion_eval.report_figures import colours, depth_grids, length_chart

    variants = variants_of(records)
    cols = colours(variants)
    benches = sorted({r["benchmark"] for r in records})
    models = sorted({str(r["model"]) for r in records if r.get("model")})
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><p class='meta'>{len(records)} records \u00b7 "
        f"{len(variants)} configs \u00b7 benchmarks: {_e(', '.join(benches) or '-')}"
        + (f" \u00b7 model: {_e(', '.join(models))}" if models else "")
        + "</p>"
    ]
    if notes:
        parts.append(
            "<div class='notes' id='notes'><b>Notes on this run</b><ul>"
            + "".join(f"<li>{_e(n)}</li>" for n in notes)
            + "</ul></div>"
        )
    if not records:
        parts.append("<section><p>No records.</p></section>")
        parts.append(_CHECK + "</main></body></html>")
        return "".join(parts)
    rows = config_rows(records)
    parts.append(_short(headline(records, rows)))
    parts.append(_configs(rows, cols))
    parts.append(_memory(rows, cols))
    parts.append(
        "<section id='benchmarks'><h2>Accuracy per benchmark</h2>"
        + _pivot_table(records, rows, cols, lambda r: r["benchmark"], benches)
        + "<p class='fine'>\u25b2 / \u25bc: the interval is above / below the baseline's on "
        "that benchmark; no mark: not told apart.</p></section>"
    )
    curves = length_chart(records, cols)
    if curves is not None:
        parts.append(
            "<section id='lengths'><h2>Accuracy vs length</h2>"
            + _img("accuracy vs length per benchmark, 95% intervals", curves)
            + "</section>"
        )
    grids = depth_grids(records, cols)
    if grids:
        parts.append("<section id='grids'><h2>Depth x length</h2>")
        for bench, fig in grids:
            parts.append(_img(f"{bench}: accuracy by depth x length (n per cell)", fig))
        parts.append("</section>")
    parts.append("<section id='tags'><h2>By tag (diffusion / scope)</h2>")
    for tag in TAGS:
        parts.append(
            _pivot_table(
                records,
                rows,
                cols,
                lambda r, tag=tag: str((r.get("tags") or {}).get(tag, "?")),
                tag_values(records, tag),
                heading=tag,
            )
        )
    parts.append(
        "<details><summary>diffusion x scope, per config</summary>"
        + _table(
            tag_rows(records),
            [
                ("variant", "config", ""),
                ("diffusion", "diffusion", ""),
                ("scope", "scope", ""),
                ("n", "n", ""),
                ("acc", "accuracy (95%)", "acc"),
            ],
        )
        + "</details></section>"
    )
    parts.append(
        "<section id='summary'><h2>Summary per config x benchmark x length</h2>"
        + _table(
            summary_rows(records),
            [
                ("variant", "config", ""),
                ("benchmark", "benchmark", ""),
                ("length", "length (tokens)", ""),
                ("context_chars", "context (chars)", "0"),
                ("n", "n", ""),
                ("errors", "errors", ""),
                ("acc", "accuracy (95%)", "acc"),
                ("peak_kv_mib", "peak KV MiB", "2"),
                ("peak_resident_kv_mib", "resident KV MiB", "2"),
                ("prefill_seconds", "prefill s", "3"),
                ("decode_tokens_per_s", "decode tok/s", "1"),
                ("prompt_tokens", "prompt tokens", "0"),
            ],
        )
        + "</section>"
    )
    errors = [r for r in records if "error" in r]
    if errors:
        parts.append(
            f"<section id='errors'><h2>Errors ({len(errors)}; first 50)</h2>"
            + _table(
                errors[:50],
                [
                    ("variant", "config", ""),
                    ("benchmark", "benchmark", ""),
                    ("sample_id", "sample", ""),
                    ("length", "length", ""),
                    ("error_kind", "kind", ""),
                    ("error", "error", ""),
                ],
            )
            + "</section>"
        )
    misses = [r for r in records if "error" not in r and float(r.get("score") or 0) < 1.0]
    if misses:
        rows_missed = [
            {
                **r,
                "gold": json.dumps(r.get("answers"))[:200],
                "pred": (r.get("prediction") or "")[:300],
                "depth": "" if r.get("depth") is None else f"{float(r['depth']):g}",
            }
            for r in misses[:40]
        ]
        parts.append(
            f"<section id='misses'><h2>Missed answers ({len(misses)}; first 40)</h2>"
            + _table(
                rows_missed,
                [
                    ("variant", "config", ""),
                    ("benchmark", "benchmark", ""),
                    ("sample_id", "sample", ""),
                    ("length", "length", ""),
                    ("depth", "depth", ""),
                    ("score", "score", "2"),
                    ("gold", "gold", ""),
                    ("pred", "prediction", ""),
                ],
            )
            + "</section>"
        )
    parts.append(_CHECK + "</main></body></html>")
    return "".join(parts)


def write_report(
    records: list[dict[str, Any]],
    run_dir: str | Path,
    title: str = "apportion run",
    notes: list[str] | None = None,
) -> Path:
    """Write ``RUN_DIR/report.html`` atomically and return its path."""
    path = Path(run_dir) / REPORT
    atomic_write(path, render_html(records, title, notes))
    return path


def render_run(run: Any, console: Any) -> Path | None:
    """Render a finished run (an :class:`apportion.runner.RunResult`): print the terminal
    tables on ``console`` and, unless ``[harness] report = false``, write ``report.html`` into
    ``run.run_dir`` with ``run.notes`` shown; returns the report's path (``None`` if none)."""
    records = list(run.records)
    title = run.config.name
    notes = list(run.notes)
    render_terminal(records, console, title=f"{title}: {len(records)} records", notes=notes)
    if not run.config.harness.report:
        return None
    return write_report(records, run.run_dir, title=title, notes=notes)
