"""Contract test suites, one per component kind (as langchain's standard tests).

A plugin's tests subclass the suite of its kind and say which component to test::

    from apportion.testing import KVPolicyContract

    class TestSnapKV(KVPolicyContract):
        component = "snapkv"

Suites that need a model use the session fixtures of :mod:`apportion.testing.fixtures`
(``smollm2``: the embedded model, loaded once). Enable them in ``conftest.py`` with
``pytest_plugins = ["apportion.testing.fixtures"]``.
"""

from apportion.testing.contracts import (
    AllocatorContract,
    AttentionContract,
    BenchmarkContract,
    KVPolicyContract,
    PromptStrategyContract,
    TrainerStrategyContract,
)

__all__ = [
    "AllocatorContract",
    "AttentionContract",
    "BenchmarkContract",
    "KVPolicyContract",
    "PromptStrategyContract",
    "TrainerStrategyContract",
]
