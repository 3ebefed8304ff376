"""ByteScale balance scheduler: every token placed once, compute balanced, bad input named."""

import pytest
from apportion_offload.balance import (
    CostModel,
    balance,
    long_tailed_lengths,
    naive_pack,
    token_balanced,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=80), st.integers(1, 12))
def test_every_token_once_and_within_budget(lengths, n_ranks):
    cap = 2048
    if max(-(-x // cap) for x in lengths) > n_ranks:
        with pytest.raises(ValueError, match="exceeds"):
            balance(lengths, n_ranks, cap)
        return
    for f in (balance, naive_pack, token_balanced):
        s = f(lengths, n_ranks, cap)
        s.check(lengths)
        for seq, group in s.cp_groups.items():
            assert len(set(group)) == len(group) >= -(-lengths[seq] // cap)
            if f is not balance:
                assert len(group) == -(-lengths[seq] // cap)
            mbs = {p.microbatch for r in group for p in s.ranks[r] if p.seq == seq}
            assert len(mbs) == 1  # a CP group runs a sequence in the same micro-step
        for r in s.ranks:  # micro-batches respect the token budget
            per = {}
            for p in r:
                per[p.microbatch] = per.get(p.microbatch, 0) + p.tokens
            assert all(v <= cap for v in per.values())


def test_long_tailed_mix_is_balanced_where_naive_packing_is_not():
    lengths = long_tailed_lengths(1024, seed=1)
    assert max(lengths) > 30 * sorted(lengths)[len(lengths) // 2]  # really long-tailed
    ours = balance(lengths, 32, 32768)
    naive = naive_pack(lengths, 32, 32768)
    assert ours.imbalance <= 1.1
    assert naive.imbalance > ours.imbalance
    assert ours.cp_groups  # the longest sequences were given CP groups


def test_cost_is_quadratic():
    c = CostModel.from_dims(hidden=1024, layers=8)
    assert c(2000) - 2 * c(1000) == pytest.approx(2 * c.quadratic * 1000**2)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([], "no sequences"),
        ([10, 0], "sequence 1"),
        ([10, 2.5], "sequence 1"),
        ([10**7], "exceeds"),
    ],
)
def test_bad_input(lengths, match):
    with pytest.raises(ValueError, match=match):
        balance(lengths, 8, 4096)
    with pytest.raises(ValueError, match="n_ranks"):
        balance([5], 0, 4096)
