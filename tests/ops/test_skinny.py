"""``tn``: the blocked ``aᵀ·b`` equals the plain GEMM at every split, and is taken where it should be."""

import pytest
import torch

from aurora_fx.ops import skinny
from aurora_fx.ops.skinny import low_rank, low_rank_into, tn


@pytest.mark.parametrize("n", [4096, 4099, 5000, 37])  # divisible, a remainder block, 16 blocks of 312, too small
@pytest.mark.parametrize("r", [1, 2, 8])
def test_tn_equals_the_plain_product(n, r):
    g = torch.Generator().manual_seed(n + r)
    a, b = torch.randn(n, r, generator=g, dtype=torch.float64), torch.randn(n, 300, generator=g, dtype=torch.float64)
    torch.testing.assert_close(tn(a, b), a.t() @ b, rtol=1e-12, atol=1e-10)


def test_tn_blocks_large_cpu_products(monkeypatch):
    """The batched form is the one that runs at adapter sizes (a broken split would fail the test above)."""
    calls = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: calls.append(self.shape) or real_sum(self, *a, **k))
    a, b = torch.randn(4096, 2), torch.randn(4096, 768)
    tn(a, b)
    assert calls == [torch.Size([16, 2, 768])]
    calls.clear()
    tn(a[:100], b[:100])  # small: the plain GEMM
    assert calls == []


def test_tn_keeps_bf16_on_one_gemm(monkeypatch):
    """bf16 partial products would round before the sum: bf16 takes the single GEMM even when large."""
    monkeypatch.setattr(skinny, "MIN_ELEMENTS", 1)
    a, b = torch.randn(1024, 2).bfloat16(), torch.randn(1024, 64).bfloat16()
    assert torch.equal(tn(a, b), a.t() @ b)
    a32, b32 = a.float(), b.float()
    torch.testing.assert_close(tn(a32, b32), a32.t() @ b32, rtol=1e-5, atol=1e-4)  # float32 blocks at this size


@pytest.mark.parametrize("r", [1, 2, 4, 5])  # the addcmul passes (r <= 4) and the GEMM
@pytest.mark.parametrize("base", ["none", "bias", "matrix", "in place"])
def test_low_rank_into_equals_addmm(r, base):
    g = torch.Generator().manual_seed(r)
    t, up = torch.randn(37, r, generator=g, dtype=torch.float64), torch.randn(r, 24, generator=g, dtype=torch.float64)
    b = {"none": None, "bias": torch.randn(24, generator=g, dtype=torch.float64),
         "matrix": torch.randn(37, 24, generator=g, dtype=torch.float64)}.get(base)
    if base == "in place":
        b = torch.randn(37, 24, generator=g, dtype=torch.float64)
        expected, out = torch.addmm(b, t, up), b
    else:
        expected, out = (t @ up if b is None else torch.addmm(b, t, up)), torch.empty(37, 24, dtype=torch.float64)
    assert low_rank_into(out, t, up, b) is out
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_low_rank_keeps_bf16_on_the_gemm(monkeypatch):
    """bf16 would round once per rank in the addcmul passes: it takes the single GEMM."""
    seen = []
    monkeypatch.setattr(torch, "addcmul", lambda *a, **k: seen.append(1))
    t, up = torch.randn(8, 2).bfloat16(), torch.randn(2, 4).bfloat16()
    torch.testing.assert_close(low_rank(t, up), t @ up)
    assert seen == []


def test_low_rank_into_adds_a_float32_product_into_a_bf16_output():
    t, up = torch.randn(37, 2), torch.randn(2, 24)
    base = torch.randn(37, 24).bfloat16()
    out = low_rank_into(torch.empty(37, 24, dtype=torch.bfloat16), t, up, base)
    assert torch.equal(out, base + (t @ up).bfloat16())
    assert torch.equal(low_rank_into(torch.empty_like(base), t, up), (t @ up).bfloat16())
