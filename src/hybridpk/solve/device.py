"""Which torch device a computation runs on: "cpu", "cuda" (or "cuda:N"), "mps", or "auto"."""

from __future__ import annotations

import torch

from ..errors import HybridPKError

__all__ = ["resolve_device", "same_device"]


def resolve_device(device="cpu") -> torch.device:
    """The torch device named by ``device``: "auto" is the first CUDA GPU when this torch build and machine
    have one, else the CPU; any other name must exist here (a HybridPKError names it and the fix). Everything
    stays float64 on every device: the solvers and the estimation are checked against scipy at tolerances
    (1e-8 and below) that float32 cannot reach."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise HybridPKError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HybridPKError(f"device {device!r}: this torch build or machine has no CUDA GPU; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HybridPKError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise HybridPKError(f"device {device!r}: MPS is not available here; use cpu or auto")
    return dev


def same_device(a, b) -> bool:
    """Whether two torch devices (or names) are one: "cuda" is the current GPU, "cuda:N" the N-th."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
