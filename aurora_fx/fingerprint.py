"""Cheap fingerprints of base weights, so an adapter checkpoint knows the base it was trained on.

A fingerprint is the float64 Frobenius norm of the weight plus eight values sampled at fixed,
evenly spaced positions of its ``(d_out, d_in)`` view: reading it costs one pass over the weight
(no hash of a 7B model's weights), and two different random or pretrained weights never agree.
A dtype change (a base cast to bf16 after training) stays within the tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from aurora_fx.distributed import full

__all__ = ["Fingerprint", "fingerprint", "differs"]

SAMPLES = 8
RTOL = 1e-2  # bf16 keeps ~3 significant digits


@dataclass(frozen=True)
class Fingerprint:
    """Norm and sampled values of a ``(d_out, d_in)`` weight."""

    norm: float
    samples: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Fingerprint:
        """Inverse of ``to_dict``."""
        return cls(float(data["norm"]), tuple(float(v) for v in data["samples"]))


@torch.no_grad()
def fingerprint(weight: torch.Tensor) -> Fingerprint | None:
    """The fingerprint of ``weight`` (None for weights without data, e.g. on the meta device)."""
    w = full(weight)
    if w.is_meta or w.numel() == 0:
        return None
    flat = w.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, SAMPLES, device=flat.device).long()
    norm = torch.linalg.vector_norm(flat, dtype=torch.float64).item()
    return Fingerprint(norm, tuple(flat[index].double().cpu().tolist()))


def differs(saved: Fingerprint, current: Fingerprint, numel: int) -> str | None:
    """How ``current`` differs from ``saved`` (None when they agree within bf16 rounding)."""
    if abs(saved.norm - current.norm) > RTOL * max(abs(saved.norm), 1e-12):
        return f"weight norm {current.norm:.6g} vs {saved.norm:.6g} when the checkpoint was saved"
    scale = RTOL * saved.norm / max(numel, 1) ** 0.5 + 1e-12  # a hundredth of the weights' RMS
    for i, (a, b) in enumerate(zip(saved.samples, current.samples, strict=True)):
        if abs(a - b) > scale + RTOL * abs(a):
            return f"sampled weight value {i} is {b:.6g}, was {a:.6g} when the checkpoint was saved"
    return None
