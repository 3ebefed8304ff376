"""Benchmark ``niah``: RULER's needle-in-a-haystack family.

Needles ``The special magic number for <key> is: <value>.`` hide in stdlib prose at a chosen
depth. Variants (RULER, Hsieh et al. 2024):

- ``single``: one needle; ask for its value.
- ``multi-key``: ``num_keys`` needles with different keys (distractors); ask for one.
- ``multi-value``: ``num_values`` needles share one key; ask for all values.
- ``multi-query``: ``num_queries`` needles with different keys; ask for all of them at once.

Values are 7-digit numbers, adjective-noun words or UUIDs. The asked needle sits at the
sample's depth; the others at seeded random depths. Scored with RULER's string-match-all
(share of gold values found) or string-match-part (any found).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from apportion.base import Benchmark, Sample
from pydantic import Field

from apportion_eval.common import DepthsConfig, rng_for, seven_digits, uuid4
from apportion_eval.scoring import METRICS
from apportion_eval.text import compose, prose_contains
from apportion_eval.words import compound

Variant = Literal["single", "multi-key", "multi-value", "multi-query"]
ValueType = Literal["number", "word", "uuid"]

_NOUN = {"number": ("number", "numbers"), "word": ("word", "words"), "uuid": ("UUID", "UUIDs")}
_TAGS = {
    "single": {"diffusion": "low", "scope": "small"},
    "multi-key": {"diffusion": "medium", "scope": "small"},
    "multi-value": {"diffusion": "low", "scope": "medium"},
    "multi-query": {"diffusion": "low", "scope": "medium"},
}
_VALUE_TOKENS = {"number": 8, "word": 6, "uuid": 26}


class NiahConfig(DepthsConfig):
    variant: Variant = Field("single", description="single, multi-key, multi-value or multi-query")
    value_type: ValueType = Field(
        "number", description="7-digit numbers, adjective-noun words or UUIDs"
    )
    num_keys: int = Field(
        4, ge=2, le=64, description="multi-key: needles in all (1 asked + distractors)"
    )
    num_values: int = Field(4, ge=2, le=64, description="multi-value: values under the one key")
    num_queries: int = Field(4, ge=2, le=64, description="multi-query: keys asked at once")
    metric: Literal["all", "part"] = Field(
        "all", description="string-match-all or string-match-part"
    )


class Niah(Benchmark):
    """RULER-style needle in a haystack (single, multi-key, multi-value, multi-query)."""

    name = "niah"
    summary = (
        "RULER needle in a haystack: single/multi-key/multi-value/multi-query; "
        "numbers, words, UUIDs"
    )
    Config = NiahConfig
    max_new_tokens = 32

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for depth in cfg.depths:
                for k in range(cfg.samples):
                    yield self._sample(tokenizer, length, depth, k)

    def _value(self, rng: Any, taken: set[str]) -> str:
        for _ in range(1000):
            v = {"number": seven_digits, "uuid": uuid4, "word": lambda r: compound(r, taken)}[
                self.config.value_type
            ](rng)
            if v not in taken and not prose_contains(v):
                taken.add(v)
                return v
        raise RuntimeError("could not draw a value absent from the haystack")

    def _sample(self, tokenizer: Any, length: int, depth: float, k: int) -> Sample:
        cfg = self.config
        rng = rng_for("niah", cfg.seed, cfg.variant, cfg.value_type, length, depth, k)
        one, many = _NOUN[cfg.value_type]
        n_keys = {
            "single": 1,
            "multi-key": cfg.num_keys,
            "multi-value": 1,
            "multi-query": cfg.num_queries,
        }[cfg.variant]
        keys: set[str] = set()
        key_list = [compound(rng, keys | {k2 for k2 in keys}) for _ in range(n_keys)]
        while len(set(key_list)) < n_keys:  # pragma: no cover - 3600 pairs make this rare
            key_list = [compound(rng) for _ in range(n_keys)]
        taken: set[str] = set(key_list)
        if cfg.variant == "multi-value":
            key = key_list[0]
            values = [self._value(rng, taken) for _ in range(cfg.num_values)]
            needles = [(f"One of the special magic {many} for {key} is: {v}.", v) for v in values]
            asked, answers = needles, values
            question = (
                f"What are all the special magic {many} for {key} mentioned in the text "
                f"above? List all {len(values)} of them."
            )
        else:
            values = [self._value(rng, taken) for _ in key_list]
            needles = [
                (f"The special magic {one} for {kk} is: {v}.", v)
                for kk, v in zip(key_list, values, strict=True)
            ]
            if cfg.variant == "multi-query":
                asked, answers = needles, values
                question = (
                    f"What are the special magic {many} for {', '.join(key_list[:-1])} and "
                    f"{key_list[-1]} mentioned in the text above? Answer with the {many} only."
                )
            else:
                asked, answers = needles[:1], values[:1]
                question = (
                    f"What is the special magic {one} for {key_list[0]} mentioned in the "
                    f"text above? Answer with the {one} only."
                )
        # the first needle sits at the asked depth, the rest at seeded random depths
        pieces = [(needles[0][0], depth)] + [(text, rng.random()) for text, _ in needles[1:]]
        composed = compose(tokenizer, length, question, pieces, rng, what=f"niah/{cfg.variant}")
        extra = _VALUE_TOKENS[cfg.value_type] * (len(answers) - 1)
        return Sample(
            id=f"niah-{cfg.variant}-{cfg.value_type}-{length}-{depth}-{k}",
            context=composed.context,
            question=question,
            answers=answers,
            length=length,
            depth=depth,
            tags=dict(_TAGS[cfg.variant]),
            meta={
                "variant": cfg.variant,
                "value_type": cfg.value_type,
                "keys": key_list,
                "needles": [t for t, _ in asked],
                "all_needles": [t for t, _ in needles],
                "needle_depths": composed.depths,
                "metric": cfg.metric,
                "context_chars": len(composed.context),
            },
            max_new_tokens=self.max_new_tokens + extra,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return METRICS[sample.meta.get("metric", self.config.metric)](sample.answers, prediction)
