"""Ctrl-C during a fit or a training (issue 20, point 4): a one-line message, the last atomic checkpoint kept,
and a resumed run that ends where an uninterrupted one does (the VAE's weights bit for bit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import hybridpk.population.fit as fit_module
import hybridpk.residual.training as training
from hybridpk.errors import HybridPKError, Interrupted
from hybridpk.population import build_model, fit_population
from hybridpk.residual import ODEBaseline, TrainConfig, train_vae
from hybridpk.residual.hybrid import _ode_only
from hybridpk.solve.examples import simulate_ehc_population
from tests.integration.ehc import fitted_ehc_population


@pytest.fixture(scope="module")
def ehc():
    ds, _, pm, fit = fitted_ehc_population(40, seed=11)
    return ds, pm, fit


def _interrupt_at(monkeypatch, module, name, call: int):
    """Make ``module.name`` raise KeyboardInterrupt (as Ctrl-C does) on its ``call``-th call."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("joint, stopping", [(True, {}), (False, {"min_epochs": 8, "patience": 4})])
@pytest.mark.parametrize("seed", [0, 1])
def test_training_interrupted_at_a_random_epoch_resumes_to_the_same_weights(ehc, tmp_path, monkeypatch, joint,
                                                                            stopping, seed):
    ds, pm, fit = ehc
    est, batch, ipred = _ode_only(fit, ds)
    sd = fit.sigma.sd_tensors()
    extra = {"baseline": ODEBaseline(fit), "eta0": est.eta} if joint else {}
    opts = dict(epochs=45, warmup_epochs=5, progress=False, joint=joint, seed=seed, checkpoint_every=7, **stopping)
    ref, ref_hist = train_vae(batch, ipred, pm.error, sd, TrainConfig(**opts), **extra)

    epoch = int(np.random.default_rng(100 + seed).integers(1, len(ref_hist)))   # a random epoch of the training
    ck = tmp_path / "vae.pt"
    cfg = TrainConfig(**opts, checkpoint=str(ck))
    with monkeypatch.context() as m:
        _interrupt_at(m, training, "_validate", epoch + 1)          # Ctrl-C inside epoch `epoch` (0-based)
        with pytest.raises(Interrupted, match=f"interrupted in epoch {epoch + 1} of 45") as info:
            train_vae(batch, ipred, pm.error, sd, cfg, **extra)
    saved = (epoch - 1) // 7 * 7 if epoch >= 1 else None             # the last checkpoint: every 7 epochs
    assert f"holds epoch {saved + 1}" in str(info.value) and "\n" not in str(info.value)
    assert int(torch.load(ck, weights_only=True)["epoch"]) == saved

    model, hist = train_vae(batch, ipred, pm.error, sd, cfg, **extra)   # resumed from the checkpoint
    assert hist == ref_hist
    for (k, v), (_, w) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(v, w), k
    assert model.best_val == ref.best_val


def test_a_checkpoint_of_other_options_or_a_damaged_one_is_refused(ehc, tmp_path):
    ds, pm, fit = ehc
    _, batch, ipred = _ode_only(fit, ds)
    sd = fit.sigma.sd_tensors()
    ck = tmp_path / "vae.pt"
    train_vae(batch, ipred, pm.error, sd, TrainConfig(epochs=3, progress=False, joint=False, checkpoint=str(ck)))
    with pytest.raises(HybridPKError, match="other data or options"):
        train_vae(batch, ipred, pm.error, sd, TrainConfig(epochs=3, progress=False, joint=False, checkpoint=str(ck),
                                                          latent_dim=3))
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(HybridPKError, match="not a hybridpk training checkpoint"):
        train_vae(batch, ipred, pm.error, sd, TrainConfig(epochs=3, progress=False, joint=False, checkpoint=str(ck)))


def test_an_interrupted_foce_fit_resumes_from_its_last_iterate(ehc, tmp_path, monkeypatch):
    """The FOCE-I checkpoint is the outer iterate: the resumed fit restarts BFGS there and reaches the
    uninterrupted fit's estimates to the convergence tolerance (documented: not bit for bit)."""
    ds, pm, ref = ehc
    ck = tmp_path / "foce.json"
    with monkeypatch.context() as m:
        _interrupt_at(m, fit_module, "_write_checkpoint", 6)            # Ctrl-C while saving iteration 6
        with pytest.raises(Interrupted, match="after 6 outer iterations; the checkpoint .* holds iteration 5"):
            fit_population(pm, ds, progress=False, covariance=False, checkpoint=ck)
    assert fit_module._read_checkpoint(ck, fit_module._fit_fingerprint(pm, ds, None, None, "auto", True),
                                       (ds.n_subjects, 3))[2] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = fit_population(pm, ds, progress=False, covariance=False, checkpoint=ck)
    assert resumed.estimation.ofv == pytest.approx(ref.estimation.ofv, abs=1e-3)
    for a, b in zip(resumed.theta, ref.theta):
        assert a.value == pytest.approx(b.value, rel=2e-3), a.name
    assert resumed.estimation.iterations >= 5
    other = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="proportional")
    with pytest.raises(HybridPKError, match="other data, model or options"):
        fit_population(other, ds, progress=False, covariance=False, checkpoint=ck)


def _cli(*args, **kw):
    """The command as a user's shell starts it: Ctrl-C (SIGINT) at its default. A child inherits an ignored
    SIGINT, and some library in a pytest worker may have left it ignored there (seen in the full suite: the
    command then ran to its end, exit 0)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}   # two runs share 2 cores
    return subprocess.Popen([sys.executable, "-m", "hybridpk", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_default_sigint, **kw)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_foce_checkpoint_keeps_the_ebes_bit_for_bit_and_reads_the_earlier_format(tmp_path):
    """Version 2 stores the EBEs as the base64 of their float64 bytes: read back, every bit is the same (subnormal,
    huge and negative zero values included); a version-1 checkpoint (JSON numbers) still resumes."""
    import json

    eta = torch.tensor([[1e-310, -0.0, 1.0 / 3.0], [1e300, -2.5e-8, np.pi]], dtype=torch.float64)
    ck = tmp_path / "foce.json"
    fit_module._write_checkpoint(ck, "k" * 64, np.array([0.1, 1.0 / 7.0]), {"iter": 4, "eta": eta})
    x, back, it = fit_module._read_checkpoint(ck, "k" * 64, (2, 3))
    assert it == 4 and x.tolist() == [0.1, 1.0 / 7.0]
    assert back.numpy().tobytes() == eta.numpy().tobytes()
    ck.write_text(json.dumps({"format": "hybridpk-foce-checkpoint", "version": 1, "fingerprint": "k" * 64,
                              "iteration": 3, "x": [0.5], "eta": eta.tolist()}))
    x, back, it = fit_module._read_checkpoint(ck, "k" * 64, (2, 3))
    assert it == 3 and back.numpy().tobytes() == eta.numpy().tobytes()
    data = json.loads(ck.read_text())
    data.update(version=2, eta_shape=[2, 3], eta_float64_base64="not base64!")
    ck.write_text(json.dumps(data))
    with pytest.raises(HybridPKError, match="damaged"):
        fit_module._read_checkpoint(ck, "k" * 64, (2, 3))


def test_ctrl_c_during_the_cli_training_keeps_the_population_fit_and_resume_gives_the_same_run(tmp_path):
    """The real command, interrupted by SIGINT during the VAE training: exit 130 with one line, the population
    fit usable in RUN; the same command with --resume ends with the weights of an uninterrupted run."""
    ds, _ = simulate_ehc_population(20, seed=11)
    data = tmp_path / "ehc.csv"
    ds.to_dataframe().to_csv(data, index=False)
    cmd = ["fit", str(data), "--model", "1cmt_oral", "--error", "combined", "--hybrid", "vae", "--epochs", "150",
           "--no-covariance", "--seed", "3"]
    full = _cli(*cmd, "--out", str(tmp_path / "full"), "--quiet")
    run = tmp_path / "run"
    proc = _cli(*cmd, "--out", str(run), "--quiet")
    deadline = time.time() + 300
    while not list((run / "checkpoint").glob("vae_*_k2.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "VAE training was interrupted" in err and "population fit is saved" in err and "--resume" in err
    from hybridpk.residual import load_run

    assert type(load_run(run)).__name__ == "FittedPopulation"              # the finished stage is usable

    resumed = _cli(*cmd, "--out", str(run), "--quiet", "--resume")
    out2, err2 = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err2
    assert "resumed: the population fit saved in" in out2
    out1, err1 = full.communicate(timeout=600)
    assert full.returncode == 0, err1
    _assert_same(torch.load(tmp_path / "full" / "vae.pt", weights_only=True), torch.load(run / "vae.pt",
                                                                                        weights_only=True))
    assert (tmp_path / "full" / "individual.csv").read_text() == (run / "individual.csv").read_text()
    assert not (run / "checkpoint").exists()


def _assert_same(a, b, where="vae.pt"):
    """Equal nested dicts of tensors, bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
