"""Benchmark ``cwe``: RULER's common-words extraction (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?").

**Contract.** The context is a numbered list of everyday words and nothing else: ``num_common``
*common* words appear ``common_freq`` times each, and as many *uncommon* words as the target
length needs appear ``uncommon_freq`` times each (the last one possibly fewer), all shuffled.
The question asks for the ``num_common`` most common words. The list, not prose, is sized to
the length: a longer context holds more uncommon words while the common ones keep their
count, so the signal thins as the context grows, as in RULER. Scored with RULER's
string-match-all: the share of the gold words the answer names.

It is an *aggregation* task: no single place in the context holds the answer, every entry
counts (diffusion high, scope large), which is what eviction policies that keep a few
"important" tokens find hardest.

**Parameters.** ``num_common`` (RULER: 10), ``common_freq`` (RULER: 30), ``uncommon_freq``
(RULER: 3). The defaults (3 words, 12 and 2 times) are scaled down so that the list fits
from 512 tokens up and the embedded 135M model has a measurable baseline at 1K (about 0.4 of
the words; with 8 and 2 times, 0.2); raise them for larger models. Words come from
:data:`apportion_eval.words.EVERYDAY`, then adjective-noun pairs when a long context needs
more.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from apportion.base import Benchmark, Sample
from pydantic import Field, model_validator

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.fit import fit_count
from apportion_eval.scoring import string_match_all
from apportion_eval.words import EVERYDAY, compound

HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)


class CweConfig(LengthsConfig):
    num_common: int = Field(3, ge=1, le=50, description="common words, all asked for")
    common_freq: int = Field(12, ge=2, le=500, description="times each common word appears")
    uncommon_freq: int = Field(
        2, ge=1, le=100, description="times each uncommon word appears (at most)"
    )

    @model_validator(mode="after")
    def _freqs(self) -> CweConfig:
        if self.common_freq <= self.uncommon_freq:
            raise ValueError(
                f"common_freq ({self.common_freq}) must exceed uncommon_freq "
                f"({self.uncommon_freq}), or the common words are not the most common"
            )
        return self


class Cwe(Benchmark):
    """RULER common-words extraction: name the few words a long numbered list repeats most."""

    name = "cwe"
    summary = "RULER common-words extraction: the N most common words of a long numbered list"
    Config = CweConfig
    max_new_tokens = 32

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                yield self._sample(tokenizer, length, k)

    def _sample(self, tokenizer: Any, length: int, k: int) -> Sample:
        cfg = self.config
        rng = rng_for(
            "cwe", cfg.seed, cfg.num_common, cfg.common_freq, cfg.uncommon_freq, length, k
        )
        vocab = list(EVERYDAY)
        rng.shuffle(vocab)
        common = vocab[: cfg.num_common]
        uncommon = vocab[cfg.num_common :]
        taken = set(vocab)
        order_seed = rng.getrandbits(64)

        def words_for(n_uncommon: int) -> list[str]:
            while len(uncommon) * cfg.uncommon_freq < n_uncommon:  # long contexts: more words
                word = compound(rng, taken)
                taken.add(word)
                uncommon.append(word)
            entries = [w for w in common for _ in range(cfg.common_freq)]
            entries += [uncommon[i // cfg.uncommon_freq] for i in range(n_uncommon)]
            rng_for("cwe-order", order_seed, n_uncommon).shuffle(entries)
            return entries

        def render(n_uncommon: int) -> str:
            lines = [f"{i}. {w}" for i, w in enumerate(words_for(n_uncommon), 1)]
            return HEADER + "\n" + "\n".join(lines)

        n = cfg.num_common
        question = (
            f"What are the {n} most common words in the list above? "
            f"Answer with the {n} words only, separated by commas."
        )
        # each entry takes at least 3 tokens ("7. cat" less the number's digits), so a list of
        # length // 3 uncommon entries is surely past the target
        n_uncommon, context = fit_count(
            tokenizer, length, question, render, 0, max(1, length // 3), what="cwe"
        )
        entries = words_for(n_uncommon)
        return Sample(
            id=f"cwe-c{cfg.num_common}x{cfg.common_freq}-u{cfg.uncommon_freq}-{length}-{k}",
            context=context,
            question=question,
            answers=common,
            length=length,
            depth=None,
            tags={"diffusion": "high", "scope": "large"},
            meta={
                "entries": len(entries),
                "uncommon_words": len(set(entries)) - len(common),
                "common_freq": cfg.common_freq,
                "uncommon_freq": cfg.uncommon_freq,
                "context_chars": len(context),
            },
            max_new_tokens=self.max_new_tokens + 4 * cfg.num_common,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(sample.answers, prediction)
