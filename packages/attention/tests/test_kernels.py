"""The Triton kernels against their torch references, run on CPU tensors under
``TRITON_INTERPRET=1`` (set here before triton compiles anything).

Tolerances (max abs difference, kernel vs reference, both accumulating in float32):
- centroid scores: 1e-4 (fp32), 2e-2 (fp16), 1e-1 (bf16): the inputs are identical, only the
  summation order differs; the bound scales with |q||c| ~ d for unit-normal data.
- sparse decode output: 1e-5 (fp32), 2e-3 (fp16), 2e-2 (bf16): the output is rounded to the
  storage dtype (one ulp of a value of magnitude <= ~1: 1e-3 fp16, 8e-3 bf16).
- log-sum-exp: 1e-4 in every dtype (float32 throughout).
- compaction: exact.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from apportion_attention.squeezed.kernels import dispatch, reference  # noqa: E402

triton_kernels = pytest.importorskip("apportion_attention.squeezed.kernels.triton_kernels")

DTYPES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (1e-1, 2e-2)}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,G,K,d", [(3, 3, 37, 64), (2, 1, 5, 32), (1, 4, 64, 48)])
def test_centroid_scores_matches_reference(dtype, rows, G, K, d):
    g = torch.Generator().manual_seed(rows * 100 + K)
    q = torch.randn(rows, G, d, generator=g).to(dtype)
    c = torch.randn(rows, K, d, generator=g).to(dtype)
    bias = torch.randn(rows, K, generator=g)
    bias[0, K // 2] = float("-inf")  # a masked centroid stays masked
    ref = reference.centroid_scores(q, c, bias, scale=0.125)
    got = triton_kernels.centroid_scores(q, c, bias, scale=0.125)
    assert got.dtype == torch.float32 and got.shape == (rows, G, K)
    assert torch.equal(torch.isinf(ref), torch.isinf(got))
    fin = torch.isfinite(ref)
    assert (ref[fin] - got[fin]).abs().max().item() <= DTYPES[dtype][0]
    nob = triton_kernels.centroid_scores(q, c, None, scale=0.125)
    assert torch.allclose(
        nob, reference.centroid_scores(q, c, None, scale=0.125), atol=DTYPES[dtype][0]
    )


@pytest.mark.parametrize("n", [1, 7, 1025, 2100])
def test_compaction_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(4, n, generator=g) < 0.37
    mask[1] = False  # empty selection
    mask[2] = True  # full selection
    ref_idx, ref_cnt = reference.compact(mask)
    idx, cnt = triton_kernels.compact(mask)
    assert torch.equal(cnt, ref_cnt)
    assert cnt[1] == 0 and cnt[2] == n
    assert idx.shape == (4, n)
    assert torch.equal(idx[:, : ref_idx.shape[1]], ref_idx)
    assert bool((idx[:, ref_idx.shape[1] :] == -1).all())
    for r in range(4):  # the definition: ascending positions of the True entries
        assert idx[r, : cnt[r]].tolist() == mask[r].nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("G,n,d,splits", [(3, 301, 64, 3), (1, 17, 32, 1), (4, 150, 64, 7)])
def test_sparse_decode_matches_reference(dtype, G, n, d, splits):
    g = torch.Generator().manual_seed(G * 1000 + n)
    rows = 4
    q = torch.randn(rows, G, d, generator=g).to(dtype)
    k = torch.randn(rows, n, d, generator=g).to(dtype)
    v = torch.randn(rows, n, d, generator=g).to(dtype)
    mask = torch.rand(rows, n, generator=g) < 0.2
    mask[1] = False  # empty: output 0, lse -inf
    mask[2] = True  # full: equals dense attention
    idx, cnt = reference.compact(mask)
    ref_o, ref_l = reference.sparse_decode(q, k, v, idx, cnt)
    got_o, got_l = triton_kernels.sparse_decode(q, k, v, idx, cnt, num_splits=splits)
    assert got_o.dtype == dtype and got_l.dtype == torch.float32
    out_tol = DTYPES[dtype][1]
    assert (ref_o.float() - got_o.float()).abs().max().item() <= out_tol
    assert bool(torch.isinf(got_l[1]).all()) and bool((got_o[1] == 0).all())
    fin = torch.isfinite(ref_l)
    assert (ref_l[fin] - got_l[fin]).abs().max().item() <= 1e-4
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[2:3].float().unsqueeze(2), k[2:3].float()[:, None], v[2:3].float()[:, None]
    ).squeeze(2)
    assert (dense - got_o[2:3].float()).abs().max().item() <= out_tol + 1e-5


def test_reference_against_core_partial_attention():
    from apportion.host.lse import partial_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 16, generator=g),
        torch.randn(2, 50, 16, generator=g),
        torch.randn(2, 50, 16, generator=g),
    )
    mask = torch.rand(2, 50, generator=g) < 0.5
    idx, cnt = reference.compact(mask)
    out, lse = reference.sparse_decode(q, k, v, idx, cnt)
    ref_o, ref_l = partial_attention(q, k, v, mask=mask[:, None, :].expand(2, 3, 50))
    assert torch.allclose(out, ref_o, atol=1e-5) and torch.allclose(lse, ref_l, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_is_named(impl):
    mod = reference if impl == "reference" else triton_kernels
    q, k = torch.randn(2, 3, 16), torch.randn(2, 10, 16)
    idx, cnt = reference.compact(torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="share a dtype"):
        mod.sparse_decode(q, k.half(), k, idx, cnt)
    with pytest.raises(ValueError, match="disagree"):
        mod.sparse_decode(q, torch.randn(2, 10, 8), torch.randn(2, 10, 8), idx, cnt)
    with pytest.raises(ValueError, match="rows"):
        mod.sparse_decode(q, k, k, idx[:1], cnt[:1])
    with pytest.raises(ValueError, match="3 dims"):
        mod.centroid_scores(q[0], k)
    with pytest.raises(ValueError, match="bias"):
        mod.centroid_scores(q, k, torch.zeros(2, 9))
    with pytest.raises(TypeError, match="torch.bool"):
        mod.compact(torch.ones(2, 10))
    with pytest.raises(ValueError, match="one device"):
        mod.sparse_decode(q, k, k, idx, cnt.to("meta"))


def test_reference_rejects_out_of_range_indices():
    q, k = torch.randn(1, 1, 8), torch.randn(1, 4, 8)
    with pytest.raises(IndexError, match="outside"):
        reference.sparse_decode(
            q, k, k, torch.tensor([[9]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
        )


def test_dispatch():
    assert dispatch("torch", "cpu") is reference
    assert dispatch("auto", "cpu") is triton_kernels  # TRITON_INTERPRET=1 is set in this module
    with pytest.raises(ValueError, match="kernels must be"):
        dispatch("cuda", "cpu")


def test_ragged_lists_equal_the_padded_reference():
    g = torch.Generator().manual_seed(5)
    rows, G, n, d, tail = 4, 3, 120, 16, 7
    q, k, v = (
        torch.randn(rows, G, d, generator=g),
        torch.randn(rows, n, d, generator=g),
        torch.randn(rows, n, d, generator=g),
    )
    mask = torch.rand(rows, n - tail, generator=g) < 0.3
    mask[1] = False  # only the tail
    parts = [
        mask[r].nonzero().flatten()[torch.randperm(int(mask[r].sum()), generator=g)]
        for r in range(rows)
    ]
    pos, counts = torch.cat(parts), [p.numel() for p in parts]  # any order within a row
    full = torch.cat([mask, torch.ones(rows, tail, dtype=torch.bool)], dim=1)
    ref_o, ref_l = reference.sparse_decode(q, k, v, *reference.compact(full), scale=0.3)
    out, lse = reference.sparse_decode_lists(q, k, v, pos, counts, scale=0.3, tail_start=n - tail)
    assert torch.allclose(out, ref_o, atol=1e-5) and torch.allclose(lse, ref_l, atol=1e-5)
    out, lse = reference.sparse_decode_lists(q, k, v, pos, counts, scale=0.3)  # no tail
    ref_o, ref_l = reference.sparse_decode(
        q,
        k,
        v,
        *reference.compact(torch.cat([mask, torch.zeros(rows, tail, dtype=torch.bool)], dim=1)),
        scale=0.3,
    )
    assert torch.allclose(out, ref_o, atol=1e-5) and torch.allclose(lse, ref_l, atol=1e-5)
    assert bool((out[1] == 0).all()) and bool(torch.isinf(lse[1]).all())
    with pytest.raises(ValueError, match="counts"):
        reference.sparse_decode_lists(q, k, v, pos, counts[:-1])
    with pytest.raises(IndexError, match="outside"):
        reference.sparse_decode_lists(q, k, v, pos, counts, tail_start=5)
