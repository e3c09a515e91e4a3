"""Data-parallel training of the hybrid on torch.distributed (gloo, two CPU processes started by torchrun): the
ranks stay identical, the training follows the single-process one for the same global minibatches and seed,
a distributed training resumes from its checkpoint exactly, and ``hybridpk fit --distributed`` writes one run.

Documented tolerance: the distributed gradient is the single-process one summed in another order, so weights agree
to rounding; measured after 6 epochs (reservoir form, joint): 2e-16 (library), 8e-16 (CLI, with form selection off).
The tests allow 1e-10."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reference.ddp_train import train

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "reference" / "ddp_train.py"
TOL = 1e-10
ITS_TOL = 1e-8

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def torchrun(*args, cwd=None):
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` (two processes, gloo on the
    loopback interface), the package importable from the source tree."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def six_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "full"
    torchrun(SCRIPT, out, 6)
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]


def test_two_processes_train_as_one(six_epochs):
    rank0, rank1 = six_epochs
    for k in rank0["state"]:                 # every update is the same all-reduced gradient on both ranks
        assert torch.equal(rank0["state"][k], rank1["state"][k]), k
    model, history = train(False, 6)
    assert _max_diff(rank0["state"], model.state_dict()) < TOL
    torch.testing.assert_close(rank0["history"], torch.tensor(history), rtol=TOL, atol=TOL)   # losses reduced


def test_a_distributed_training_resumes_from_its_checkpoint(six_epochs, tmp_path):
    ck = tmp_path / "vae.ckpt"
    torchrun(SCRIPT, tmp_path / "first", 3, ck)
    saved = torch.load(ck, weights_only=True)          # tensors only, written atomically
    assert int(saved["epoch"]) == 2
    torchrun(SCRIPT, tmp_path / "resumed", 6, ck)
    resumed = torch.load(f"{tmp_path / 'resumed'}.rank0", weights_only=True)
    for k, v in six_epochs[0]["state"].items():
        assert torch.equal(resumed["state"][k], v), k
    assert torch.equal(resumed["history"], six_epochs[0]["history"])


def test_cli_fit_distributed_writes_one_run_as_a_single_process_would(tmp_path):
    from hybridpk.cli import main
    from hybridpk.solve.examples import simulate_ehc_population

    ds, _ = simulate_ehc_population(24, seed=3)
    ds.to_dataframe().to_csv(tmp_path / "ehc.csv", index=False)
    opts = ["--model", "1cmt_oral", "--iiv", "CL,V,KA", "--error", "combined", "--hybrid", "vae", "--hybrid-form",
            "reservoir", "--epochs", "6", "--no-classifier", "--no-covariance"]
    p = torchrun("-m", "hybridpk", "fit", tmp_path / "ehc.csv", *opts, "--distributed", "--out", tmp_path / "ddp",
                 cwd=tmp_path)
    assert p.stdout.count("wrote ") == 1           # one process reports; the others compute silently
    assert {"summary.json", "vae.pt", "vae.json"} <= {f.name for f in (tmp_path / "ddp").iterdir()}
    assert main(["fit", str(tmp_path / "ehc.csv"), *opts, "--quiet", "--out", str(tmp_path / "one")]) == 0
    a = torch.load(tmp_path / "ddp" / "vae.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "one" / "vae.pt", weights_only=True)["state"]
    # the trained weights, and the typical-value shifts as training left them (vae.json), to TOL; the shifts after
    # the ITS's THETA step add the training patients' mean MAP ETA, an L-BFGS optimum (stopping at changes of
    # 1e-12 in the objective): to ITS_TOL
    shift_a, shift_b = a.pop("log_shift"), b.pop("log_shift")
    assert _max_diff(a, b) < TOL
    trained = [json.loads((tmp_path / r / "vae.json").read_text())["trained_log_shift"] for r in ("ddp", "one")]
    assert max(abs(x - y) for x, y in zip(*trained)) < TOL
    assert float((shift_a - shift_b).abs().max()) < ITS_TOL


def test_distributed_outside_torchrun_is_refused_with_the_command(tmp_path, capsys, monkeypatch):
    from hybridpk.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "d.csv").write_text("ID,TIME,AMT,DV,EVID,MDV\n1,0,100,0,1,1\n1,1,0,2.0,0,0\n")
    assert main(["fit", str(tmp_path / "d.csv"), "--model", "1cmt_oral", "--hybrid", "vae", "--distributed",
                 "--out", str(tmp_path / "r")]) != 0
    assert "torchrun --nproc_per_node" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "d.csv"), "--model", "1cmt_oral", "--distributed",
                 "--out", str(tmp_path / "r")]) != 0
    assert "add --hybrid vae" in capsys.readouterr().err
