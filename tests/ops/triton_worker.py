"""Run by tests/ops/test_triton.py in a fresh process with TRITON_INTERPRET=1 (not collected by pytest).

Checks the Triton kernels (``aurora_fx.ops.triton_ops``) on CPU tensors against the functional oracle,
forward and backward, at small odd shapes (N=37, d_in=24, d_out=40, r̃ = 1…4, z inside, on and outside
the spline grid) in float32 and bfloat16, and at multi-block shapes (N=150, d_out=140: three row blocks of
the spline kernels and three column tiles of the rank update, both ragged); prints one JSON line per case
with the worst errors.
"""

from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running this worker"

import torch  # noqa: E402

from aurora_fx import functional as AF  # noqa: E402
from aurora_fx.ops import triton_ops as T  # noqa: E402

N, D_IN, D_OUT = 37, 24, 40
BIG_N, BIG_D_OUT = 150, 140  # > 2 blocks of 64 rows (spline kernels), > 2 tiles of 64 columns (rank update)


def _inputs(r: int, dtype: torch.dtype, spread: float, seed: int, n: int = N, d_out: int = D_OUT):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    x = leaf(n, D_IN)
    A = leaf(r, D_IN, scale=spread / D_IN**0.5)  # z ≈ N(0, spread²): inside, on and past the grid
    return x, leaf(n, d_out), A, leaf(d_out, r, scale=0.3), leaf(r, r), leaf(r, 8, scale=0.3)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def aurora_case(r: int, dtype: torch.dtype, spread: float, n: int = N, d_out: int = D_OUT) -> dict:
    x, base, A, B, H, Ws = inputs = _inputs(r, dtype, spread, seed=r, n=n, d_out=d_out)
    g = torch.randn(n, d_out, generator=torch.Generator().manual_seed(9)).to(dtype)
    out, z = T.aurora_delta_add_triton(base, x, A, B, H, Ws, 2.0, -1.0, 0.4)
    knots = AF.spline_knots(dtype=torch.float64)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_in[1] + AF.aurora_delta(ref_in[0], ref_in[2], ref_in[3], ref_in[4], ref_in[5], knots, 2.0)
    got, want = _grads(out, inputs, g), _grads(ref, ref_in, g.double())
    return {"op": "aurora", "r": r, "dtype": str(dtype), "spread": spread, "n": n, "d_out": d_out,
            "z_outside": float((z.abs() > 2.2).float().mean()),
            "forward": float((out.double() - ref).abs().max() / ref.abs().max()),
            "backward": max(float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))
                            for a, b in zip(got, want, strict=True))}


def lora_case(r: int, dtype: torch.dtype, n: int = N, d_out: int = D_OUT) -> dict:
    x, base, A, B, _, _ = inputs = _inputs(r, dtype, 1.0, seed=10 + r, n=n, d_out=d_out)
    inputs = inputs[:4]
    g = torch.randn(n, d_out, generator=torch.Generator().manual_seed(9)).to(dtype)
    out, _ = T.lora_delta_add_triton(base, x, A, B, 4.0)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_in[1] + AF.lora_delta(ref_in[0], ref_in[2], ref_in[3], 4.0)
    got, want = _grads(out, inputs, g), _grads(ref, ref_in, g.double())
    forward = float((out.double() - ref).abs().max() / ref.abs().max())
    return {"op": "lora", "r": r, "dtype": str(dtype), "n": n, "d_out": d_out, "forward": forward,
            "backward": max(float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))
                            for a, b in zip(got, want, strict=True))}


def inplace_case() -> dict:
    x, base, A, B, H, Ws = (t.detach() for t in _inputs(2, torch.float32, 1.0, seed=5))
    expected = T.aurora_delta_add_triton(base, x, A, B, H, Ws, 2.0, -1.0, 0.4)[0]
    target = base.clone()
    returned = T.aurora_delta_add_inplace_triton(target, x, A, B, H, Ws, 2.0, -1.0, 0.4)
    return {"op": "inplace", "same_tensor": returned is target, "forward": float((target - expected).abs().max())}


def opcheck_case() -> dict:
    """``opcheck`` of the Triton ops (schema and autograd registration: the fake-tensor and AOT checks need the
    kernels to run on fake tensors, which the CPU interpreter cannot; tests/gpu runs them) and a float32
    ``gradcheck`` of the two differentiable ones (their kernels compute in float32, so float64 gradcheck does not
    apply: a float64 input is rounded to float32 inside)."""
    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    gen = torch.Generator().manual_seed(3)
    x, base, A, B, H, Ws = leaf(7, 6), leaf(7, 5), leaf(2, 6), leaf(5, 2), leaf(2, 2), leaf(2, 8)
    ops = torch.ops.aurora_fx
    z = A.detach() @ x.detach().t()
    calls = {"aurora_delta_add_triton": (base, x, A, B, H, Ws, 2.0, -1.0, 0.4),
             "lora_delta_add_triton": (base, x, A, B, 2.0),
             "anl_forward_triton": (z.t().contiguous(), H.detach(), Ws.detach(), -1.0, 0.4),
             "anl_backward_triton": (z.t().contiguous(), torch.randn(7, 2, generator=gen), H.detach(), Ws.detach(),
                                     -1.0, 0.4),
             "rank_update_triton": (base.detach(), z.t().contiguous(), B.detach()),
             "rank_update_inplace_triton": (base.detach().clone(), z.t().contiguous(), B.detach())}
    out = {}
    for name, args in calls.items():
        try:
            torch.library.opcheck(getattr(ops, name).default, args,
                                  test_utils=("test_schema", "test_autograd_registration"))
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for name in ("aurora_delta_add_triton", "lora_delta_add_triton"):
        args = calls[name]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        rest = args[len(tensors):]
        op = getattr(ops, name).default
        out[f"{name}_gradcheck"] = torch.autograd.gradcheck(lambda *t, op=op, rest=rest: op(*t, *rest)[0], tensors,
                                                            eps=1e-3, atol=1e-2, rtol=1e-2)
    return {"op": "opcheck", **out}


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for r in (1, 2, 3, 4):
            for spread in (0.5, 3.0):
                print(json.dumps(aurora_case(r, dtype, spread)))
            print(json.dumps(lora_case(r, dtype)))
    for r in (2, 3):  # several row blocks and column tiles, ragged edges
        print(json.dumps(aurora_case(r, torch.float32, 3.0, n=BIG_N, d_out=BIG_D_OUT)))
        print(json.dumps(lora_case(r, torch.float32, n=BIG_N, d_out=BIG_D_OUT)))
    print(json.dumps(inplace_case()))
    print(json.dumps(opcheck_case()))


if __name__ == "__main__":
    main()
