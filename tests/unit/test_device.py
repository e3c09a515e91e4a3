"""resolve_device: "auto" and the names torch knows, refused by name where this machine lacks the device."""

from __future__ import annotations

import pytest
import torch

from hybridpk.errors import HybridPKError
from hybridpk.solve import resolve_device


def test_auto_is_a_gpu_when_there_is_one_else_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("AUTO") == torch.device("cuda")


def test_named_devices_pass_and_missing_ones_are_refused_with_the_fix(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(HybridPKError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HybridPKError, match="no CUDA GPU; use cpu or auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HybridPKError, match="has 1 CUDA GPU"):
        resolve_device("cuda:3")


def test_training_takes_auto_as_the_command_line_does():
    """TrainConfig(device="auto") trains where the CLI's --device auto would (here the CPU), with the same result
    as device "cpu"."""
    from hybridpk.population import build_model, fit_population
    from hybridpk.residual import ODEBaseline, TrainConfig, train_vae
    from hybridpk.residual.hybrid import _ode_only
    from hybridpk.solve.examples import simulate_ehc_population

    ds, _ = simulate_ehc_population(20, seed=2)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    fit = fit_population(pm, ds, progress=False, covariance=False)
    est, batch, ipred = _ode_only(fit, ds)
    runs = {}
    for device in ("cpu", "auto"):
        cfg = TrainConfig(epochs=3, min_epochs=3, seed=1, progress=False, device=device, its_iterations=0)
        runs[device] = train_vae(batch, ipred, pm.error, fit.sigma.sd_tensors(), cfg, baseline=ODEBaseline(fit),
                                 eta0=est.eta)[1]
    if not torch.cuda.is_available():
        assert runs["auto"] == runs["cpu"]
    assert len(runs["auto"]) == 3
