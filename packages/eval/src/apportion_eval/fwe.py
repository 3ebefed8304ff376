"""Benchmark ``fwe``: RULER's frequent-words extraction (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?").

**Contract.** The context is "coded text": synthetic words (``word_length`` random lower-case
letters) whose counts follow a Zipf law, the word of rank ``r`` appearing
``floor(N * r**-alpha / zeta(alpha))`` times (RULER's expected counts, not a sample), all
shuffled. As in RULER the rank-1 "word" is noise, ``...``, that the question says to ignore;
the gold answers are the ``top`` words of ranks 2 to ``top + 1``. ``N`` is sized to the
target length. Scored with RULER's string-match-all: the share of the gold words named.

Like ``cwe`` it is an aggregation task (diffusion high, scope large) but the words carry no
meaning and the frequencies fall off smoothly, so it is counting, not recognising
familiar words. A larger ``alpha`` makes the top words stand out more.

**Parameters.** ``alpha`` (RULER: 2.0), ``word_length`` (RULER: 6), ``vocab_size``
(RULER: 2000), ``top`` (RULER: 3). A length too short to give the ``top`` words counts
strictly above the next word's is a :class:`~apportion.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Iterator
from typing import Any

from apportion.base import Benchmark, Sample
from apportion.errors import ConfigError
from pydantic import Field

from apportion_eval.common import LengthsConfig, rng_for
from apportion_eval.fit import fit_count
from apportion_eval.scoring import string_match_all

NOISE = "..."
HEADER = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the most frequently appearing coded words."
)


class FweConfig(LengthsConfig):
    alpha: float = Field(2.0, gt=1.0, le=10.0, description="Zipf exponent of the word counts")
    word_length: int = Field(6, ge=3, le=16, description="letters per synthetic word")
    vocab_size: int = Field(2000, ge=10, le=100_000, description="distinct synthetic words")
    top: int = Field(3, ge=1, le=10, description="most frequent words asked for")


@functools.lru_cache(maxsize=16)
def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum plus the Euler-Maclaurin tail."""
    head = math.fsum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha


def zipf_counts(total: int, alpha: float, vocab_size: int) -> list[int]:
    """RULER's expected count of each rank: ``floor(total * r**-alpha / zeta(alpha))``."""
    z = zeta(alpha)
    return [int(total * r**-alpha / z) for r in range(1, vocab_size + 1)]


class Fwe(Benchmark):
    """RULER frequent-words extraction: name the most frequent words of Zipf-distributed text."""

    name = "fwe"
    summary = "RULER frequent-words extraction: the top words of Zipf-distributed coded text"
    Config = FweConfig
    max_new_tokens = 32

    def samples(self, tokenizer: Any) -> Iterator[Sample]:
        cfg = self.config
        for length in cfg.lengths:
            for k in range(cfg.samples):
                yield self._sample(tokenizer, length, k)

    def _sample(self, tokenizer: Any, length: int, k: int) -> Sample:
        cfg = self.config
        rng = rng_for(
            "fwe", cfg.seed, cfg.alpha, cfg.word_length, cfg.vocab_size, cfg.top, length, k
        )
        vocab: set[str] = set()
        while len(vocab) < cfg.vocab_size:
            vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(cfg.word_length)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = NOISE  # rank 1 is noise, as in RULER
        order_seed = rng.getrandbits(64)

        def words_for(total: int) -> list[str]:
            counts = zipf_counts(total, cfg.alpha, cfg.vocab_size)
            words = [w for w, c in zip(ranked, counts, strict=True) for _ in range(c)]
            rng_for("fwe-order", order_seed, total).shuffle(words)
            return words

        def render(total: int) -> str:
            return HEADER + "\n" + " ".join(words_for(total))

        question = (
            f"Do not provide any explanation. Please ignore the dots '{NOISE}'. What are the "
            f"{cfg.top} most frequently appearing words in the coded text above? "
            f"Answer with the {cfg.top} words only, separated by commas."
        )
        total, context = fit_count(tokenizer, length, question, render, 1, 2 * length, what="fwe")
        counts = zipf_counts(total, cfg.alpha, cfg.vocab_size)
        after = counts[cfg.top + 1] if cfg.top + 1 < len(counts) else 0
        if counts[cfg.top] <= after:
            raise ConfigError(
                f"fwe: at length {length} the top {cfg.top} words are not clearly the most "
                f"frequent (counts {counts[1 : cfg.top + 2]}); use a larger length, a smaller "
                f"top or a larger alpha",
                [("lengths", str(length))],
            )
        answers = ranked[1 : cfg.top + 1]
        return Sample(
            id=f"fwe-a{cfg.alpha}-w{cfg.word_length}-t{cfg.top}-{length}-{k}",
            context=context,
            question=question,
            answers=answers,
            length=length,
            depth=None,
            tags={"diffusion": "high", "scope": "large"},
            meta={
                "words": sum(counts),
                "counts": {w: c for w, c in zip(ranked[: cfg.top + 2], counts, strict=False)},
                "distinct": sum(1 for c in counts if c > 0),
                "alpha": cfg.alpha,
                "context_chars": len(context),
            },
            max_new_tokens=self.max_new_tokens + 4 * cfg.top,
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(sample.answers, prediction)
