"""Typed errors of apportion-rl."""

from __future__ import annotations

from apportion.errors import ApportionError


class RewardFunctionError(ApportionError):
    """A reward function raised, returned a non-finite or non-numeric reward, or the wrong
    number of rewards (with ``on_reward_error="raise"``). ``function`` names it, ``kind`` is
    one of ``raised``, ``non_finite``, ``not_a_number``, ``wrong_length``."""

    def __init__(self, message: str, *, function: str, kind: str):
        super().__init__(message)
        self.function = function
        self.kind = kind
