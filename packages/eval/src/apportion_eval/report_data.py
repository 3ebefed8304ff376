"""What the run report says, computed from the records alone (no matplotlib, no HTML).

Every accuracy comes with its 95% Wilson interval (:mod:`apportion.stats`). Two configs are
told apart only when their intervals do not overlap (:func:`apportion.stats.separated`): the
verdicts here (better / worse than the baseline, best within a memory budget) never call a
difference inside the intervals a win. The baseline is the first config of the run. A record
that errored has score 0 and counts as a miss; its peak KV is not measured, so memory is the
mean peak KV over a config's records that ran.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from apportion.stats import accuracy_interval, separated

#: the verdicts of a config against the baseline
BASELINE, BETTER, WORSE, TIED = "baseline", "better", "worse", "not told apart"


@dataclass(frozen=True)
class Acc:
    """A mean accuracy with its 95% Wilson interval over ``n`` samples."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, scores: Iterable[float]) -> Acc:
        return cls(*accuracy_interval(scores))

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high

    def text(self) -> str:
        """``94.4% (81-99)``: the mean and its interval in percent; ``-`` with no samples."""
        if self.n == 0:
            return "-"
        return f"{100 * self.mean:.1f}% ({100 * self.low:.0f}-{100 * self.high:.0f})"


def score(r: dict[str, Any]) -> float:
    return float(r.get("score") or 0.0)


def ok_records(rs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rs if "error" not in r]


def mean(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def variants_of(records: list[dict[str, Any]]) -> list[str]:
    """Configs in order of first appearance (the baseline first)."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["variant"], None)
    return list(seen)


def _rank(records: list[dict[str, Any]]) -> dict[str, int]:
    return {v: i for i, v in enumerate(variants_of(records))}


def _kv_mib(rs: list[dict[str, Any]]) -> float:
    return mean(r["peak_kv_bytes"] / 2**20 for r in rs if finite(r.get("peak_kv_bytes")))


def _resident_mib(rs: list[dict[str, Any]]) -> float:
    """Mean peak KV on the device: ``peak_resident_kv_bytes`` where an allocator offloaded,
    else (every byte resident, or a record older than the field) ``peak_kv_bytes``."""
    return mean(
        (r.get("peak_resident_kv_bytes") or r["peak_kv_bytes"]) / 2**20
        for r in rs
        if finite(r.get("peak_kv_bytes"))
    )


def verdict(acc: Acc, base: Acc) -> str:
    """``better`` / ``worse`` when the intervals are apart, else ``not told apart``."""
    if acc.n == 0 or base.n == 0 or not separated(acc.interval, base.interval):
        return TIED
    return BETTER if acc.low > base.high else WORSE


# ----------------------------------------------------------------------------- tables
def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, benchmark, length): n, errors, accuracy with its interval (``low``,
    ``high``) and the mean costs of the samples that ran."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["variant"], r["benchmark"], int(r.get("length") or 0))].append(r)
    rank = _rank(records)
    rows = []
    for (variant, bench, length), rs in sorted(
        groups.items(), key=lambda kv: (rank[kv[0][0]], kv[0][1], kv[0][2])
    ):
        ok = ok_records(rs)
        acc = Acc.of(score(r) for r in rs)
        rows.append(
            {
                "variant": variant,
                "benchmark": bench,
                "length": length,
                "n": len(rs),
                "errors": len(rs) - len(ok),
                "accuracy": acc.mean,
                "low": acc.low,
                "high": acc.high,
                "acc": acc,
                "peak_kv_mib": _kv_mib(ok),
                "peak_resident_kv_mib": _resident_mib(ok),
                "prefill_seconds": mean(r.get("prefill_seconds") for r in ok),
                "decode_tokens_per_s": mean(r.get("decode_tokens_per_s") for r in ok),
                "prompt_tokens": mean(r.get("prompt_tokens") for r in ok),
                "context_chars": mean(r.get("context_chars", 0) for r in rs),
            }
        )
    return rows


def tag_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy (with interval) per config and (diffusion, scope) tag pair."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        tags = r.get("tags") or {}
        key = (r["variant"], str(tags.get("diffusion", "?")), str(tags.get("scope", "?")))
        groups[key].append(score(r))
    rank = _rank(records)
    rows = []
    for (v, d, s), xs in sorted(groups.items(), key=lambda kv: (rank[kv[0][0]], *kv[0][1:])):
        acc = Acc.of(xs)
        rows.append(
            {
                "variant": v,
                "diffusion": d,
                "scope": s,
                "n": acc.n,
                "accuracy": acc.mean,
                "low": acc.low,
                "high": acc.high,
                "acc": acc,
            }
        )
    return rows


#: the order tag values are shown in (others follow, sorted)
TAG_ORDER = {"low": 0, "low-medium": 1, "medium": 2, "high": 3, "small": 0, "large": 3}


def tag_values(records: list[dict[str, Any]], tag: str) -> list[str]:
    values = {str((r.get("tags") or {}).get(tag, "?")) for r in records}
    return sorted(values, key=lambda v: (TAG_ORDER.get(v, 9), v))


def pivot(records: list[dict[str, Any]], key: Any) -> tuple[list[str], dict[tuple[str, str], Acc]]:
    """(columns, {(config, column): Acc}) with ``key(record)`` naming a record's column."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    cols: dict[str, None] = {}
    for r in records:
        col = key(r)
        cols.setdefault(col, None)
        groups[(r["variant"], col)].append(score(r))
    return list(cols), {k: Acc.of(v) for k, v in groups.items()}


def memory_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per config with a measured peak KV: accuracy (with interval) and mean peak
    KV MiB over its samples that ran."""
    return [
        {k: row[k] for k in ("variant", "accuracy", "low", "high", "peak_kv_mib", "n")}
        for row in config_rows(records)
        if finite(row["peak_kv_mib"])
    ]


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point dominates (at most the memory and at least the mean accuracy,
    one of them strictly), sorted by memory. The front is of the means: whether a step along
    it is more than noise is what :func:`budget_lines` says."""
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
    return sorted(front, key=lambda p: (p["peak_kv_mib"], -p["accuracy"]))


def config_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per config (all benchmarks pooled), in run order: its number ``k`` (1 for the
    baseline), accuracy with interval, verdict against the baseline, errors by kind, mean
    costs, whether it is on the Pareto front, and how it was measured."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[r["variant"]].append(r)
    rows = []
    for k, v in enumerate(variants_of(records), 1):
        rs = by[v]
        ok = ok_records(rs)
        bad = [r for r in rs if "error" in r]
        acc = Acc.of(score(r) for r in rs)
        rows.append(
            {
                "k": k,
                "variant": v,
                "n": acc.n,
                "acc": acc,
                "accuracy": acc.mean,
                "low": acc.low,
                "high": acc.high,
                "errors": len(bad),
                "error_kinds": Counter(str(r.get("error_kind") or "error") for r in bad),
                "first_error": str(bad[0]["error"]) if bad else "",
                "peak_kv_mib": _kv_mib(ok),
                "prefill_seconds": mean(r.get("prefill_seconds") for r in ok),
                "decode_tokens_per_s": mean(r.get("decode_tokens_per_s") for r in ok),
                "shared_prefill": max((int(r.get("shared_prefill") or 1) for r in ok), default=1),
                "batch_size": max((int(r.get("batch_size") or 1) for r in ok), default=1),
                "components": dict(rs[0].get("components") or {}),
            }
        )
    if rows:
        base = rows[0]["acc"]
        for i, row in enumerate(rows):
            row["vs_baseline"] = BASELINE if i == 0 else verdict(row["acc"], base)
        front = {p["variant"] for p in pareto_front([r for r in rows if finite(r["peak_kv_mib"])])}
        for row in rows:
            row["pareto"] = row["variant"] in front
    return rows


# ----------------------------------------------------------------------------- in words
def fmt_mib(x: float) -> str:
    if not finite(x):
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def name(row: dict[str, Any]) -> str:
    """``#3 snapkv``: a config as the figures number it."""
    return f"#{row['k']} {row['variant']}"


def _listing(rows: list[dict[str, Any]], limit: int = 5, memory: bool = False) -> str:
    def one(r: dict[str, Any]) -> str:
        mib = f", {fmt_mib(r['peak_kv_mib'])} MiB" if memory else ""
        return f"{name(r)} {r['acc'].text()}{mib}"

    shown = [one(r) for r in rows[:limit]]
    if len(rows) > limit:
        shown.append(f"and {len(rows) - limit} more")
    return "; ".join(shown)


@dataclass
class Headline:
    """The top of the report in words: each a list of plain-text lines."""

    budgets: list[str]
    baseline: list[str]
    errors: list[str]
    measured: list[str]


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    """For each config on the Pareto front (cheapest first): the best config at that peak KV
    or less, and the configs within that budget it is not told apart from."""
    measured = [r for r in rows if finite(r["peak_kv_mib"])]
    out = []
    for p in sorted((r for r in measured if r.get("pareto")), key=lambda r: r["peak_kv_mib"]):
        budget = p["peak_kv_mib"]
        within = [r for r in measured if r["peak_kv_mib"] <= budget and r is not p]
        ties = [r for r in within if not separated(r["acc"].interval, p["acc"].interval)]
        head = f"At <= {fmt_mib(budget)} MiB peak KV"
        if p["errors"]:
            head += f" (its peak KV from the {p['n'] - p['errors']} of {p['n']} samples that ran)"
        if not within:
            out.append(f"{head}, {name(p)} is the only config: {p['acc'].text()}.")
        elif not ties:
            out.append(
                f"{head}, {name(p)} is best: {p['acc'].text()}, above every other config "
                f"within this budget beyond the intervals."
            )
        else:
            ties.sort(key=lambda r: (r["peak_kv_mib"], -r["accuracy"]))
            out.append(
                f"{head}, {name(p)} measures best: {p['acc'].text()}, but is not told apart "
                f"from {_listing(ties, memory=True)} (intervals overlap)."
            )
    if not out:
        out.append("No config has a measured peak KV (every record errored).")
    return out


def baseline_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    base = rows[0]
    out = [
        f"Baseline: {name(base)}, {base['acc'].text()}, {fmt_mib(base['peak_kv_mib'])} MiB peak KV."
    ]
    others = rows[1:]
    if not others:
        return out
    better = [r for r in others if r["vs_baseline"] == BETTER]
    worse = [r for r in others if r["vs_baseline"] == WORSE]
    tied = [r for r in others if r["vs_baseline"] == TIED]
    if better:
        out.append(f"Better than the baseline (interval above its): {_listing(better)}.")
    out.append(
        f"No better than the baseline: {len(worse) + len(tied)} of {len(others)} configs."
        if worse or tied
        else "Every other config is better than the baseline."
    )
    if worse:
        out.append(f"Worse (interval entirely below the baseline's): {_listing(worse, 8)}.")
    if tied:
        out.append(f"Not told apart from the baseline (intervals overlap): {_listing(tied, 8)}.")
    return out


def error_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if not r["errors"]:
            continue
        kinds = ", ".join(f"{n} {kind}" for kind, n in r["error_kinds"].most_common())
        out.append(
            f"{name(r)}: {r['errors']} of {r['n']} records are errors ({kinds}), counted as "
            f"misses; first: {r['first_error'][:160]}"
        )
    return out or ["No errors."]


def measured_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How costs were measured where it differs from one sample alone."""
    out = []
    shared = [r for r in rows if r["shared_prefill"] > 1]
    if shared:
        out.append(
            f"{len(shared)} config(s) shared one prefill with up to "
            f"{max(r['shared_prefill'] for r in shared)} configs: their prefill seconds are "
            "the shared prefill's, not each config's own."
        )
    batched = [r for r in rows if r["batch_size"] > 1]
    if batched:
        out.append(
            f"{len(batched)} config(s) decoded in batches of up to "
            f"{max(r['batch_size'] for r in batched)} rows (the configs of one sample, or "
            "the samples of one config): their decode tok/s are the whole batch's, not one "
            "row's."
        )
    return out


def mode_lines(records: list[dict[str, Any]]) -> list[str]:
    """Whether KV policies saw the question when they compressed the context."""
    modes = {r.get("question_in_prefill", True) for r in records}
    if modes == {False}:
        return [
            "Query-agnostic: each context was compressed before its question was fed "
            "(as when a stored context is asked later); the question's own entries are kept."
        ]
    if modes == {True, False}:
        return ["Records of both modes (question in the prefill, and query-agnostic) are mixed."]
    return ["Query-aware: the question was part of the prefill the KV policies compressed."]


def headline(records: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None) -> Headline:
    rows = config_rows(records) if rows is None else rows
    return Headline(
        budget_lines(rows),
        baseline_lines(rows),
        error_lines(rows),
        mode_lines(records) + measured_lines(rows),
    )
