"""A small joint (reservoir-form) training of the hybrid, single-process or as one rank of a torchrun group.

tests/integration/test_distributed.py runs this file under ``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/reference/ddp_train.py OUT EPOCHS [CHECKPOINT]`` and calls :func:`train` in its own
process for the single-process reference. Each rank saves its weights and history to OUT.rank{r}."""

from __future__ import annotations

import sys
import warnings

import torch

BATCH_SIZE = 8      # 19 training patients: minibatches of 8, 8 and 3 (shards of 4/4, 4/4 and 2/1 on two ranks)


def train(distributed: bool, epochs: int, checkpoint: str | None = None):
    """(the trained HybridVAE, its history) on 24 simulated EHC patients (seed 3), the residual error SDs learnt
    too (their gradients are summed over the ranks like the networks')."""
    from hybridpk.population import build_model, fit_population
    from hybridpk.residual import ODEBaseline, TrainConfig, train_vae
    from hybridpk.residual.hybrid import _ode_only
    from hybridpk.solve.examples import simulate_ehc_population

    ds, _ = simulate_ehc_population(24, seed=3)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    est, batch, ipred = _ode_only(fit, ds)
    cfg = TrainConfig(epochs=epochs, warmup_epochs=2, progress=False, batch_size=BATCH_SIZE, form="reservoir",
                      checkpoint=checkpoint, checkpoint_every=1, distributed=distributed, learn_sigma=True)
    return train_vae(batch, ipred, pm.error, fit.sigma.sd_tensors(), cfg, baseline=ODEBaseline(fit), eta0=est.eta)


def main(out: str, epochs: int, checkpoint: str | None) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        model, history = train(True, epochs, checkpoint)
        torch.save({"state": model.state_dict(), "history": torch.tensor(history)},
                   f"{out}.rank{torch.distributed.get_rank()}")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
