"""Pieces every benchmark config shares: lengths, depths, samples, seed, with validation."""

from __future__ import annotations

import hashlib
import random
import uuid

from apportion.config import ComponentConfig
from pydantic import Field, field_validator


class LengthsConfig(ComponentConfig):
    """Lengths in the tested model's tokens (chat template and question included)."""

    lengths: list[int] = Field([1024, 2048, 4096], description="prompt lengths in model tokens")
    samples: int = Field(3, ge=1, le=1000, description="samples per (length, depth) cell")
    seed: int = Field(0, description="the same seed gives the same samples")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 128 for n in v):
            raise ValueError("lengths must be a non-empty list of token counts >= 128")
        if len(set(v)) != len(v):
            raise ValueError(f"lengths has duplicates: {v}")
        return v


class DepthsConfig(LengthsConfig):
    depths: list[float] = Field(
        [0.1, 0.5, 0.9], description="where the information sits, 0=start 1=end"
    )

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must be a non-empty list of fractions in [0, 1]")
        if len(set(v)) != len(v):
            raise ValueError(f"depths has duplicates: {v}")
        return v


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (Python's str hash is salted)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def seven_digits(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
