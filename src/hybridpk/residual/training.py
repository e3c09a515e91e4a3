"""Training the hybrid's network: maximise the ELBO over minibatches of patients, each patient's ETAs re-estimated
with z in joint mode (and optionally the residual error SDs); early stopping on held-out patients; atomic,
tensors-only checkpoints that training resumes from exactly (an interrupted and resumed training ends with the
same weights as an uninterrupted one: the checkpoint holds the optimisers, both random generators, the early-
stopping state and the history, and is refused when it was written for other data or options).

The ELBO is the residual-error likelihood of the population model at the hybrid prediction, minus
beta KL(q(z | patient) || N(0, I)) with beta warmed up from 0, minus an L2 penalty on the correction that
keeps it at zero where the ODE already fits. In joint mode (the default) every patient's ETAs are free
parameters too, starting at the ODE-only MAP, with their OMEGA prior term -log p(ETA) in the objective, and
log-shifts of the typical values are learnt with the networks. Gradient clipping, NaN guard, seeded.

Training weighs the observations with the population fit's residual error (SIGMA), which holds the misfit the
correction is there to carry (EHC dosing benchmark, seed 1: PROP 0.24 and ADD 0.11 against the truth's 0.10 and
0.05). With ``learn_sigma`` the SDs are learnt with the networks instead, as log SDs from the population fit's,
by maximum likelihood within the ELBO like the ETAs (a joint MAP: below FOCE-I's on data the ODE describes, as it
does not discount the ETAs' degrees of freedom; the ITS step after training starts from them). It is not the
default because it did not pay on the benchmarks (benchmarks/RESULTS-mipd_hybrid.txt, RESULTS-vae_ehc.txt,
2026-12-06): it learns SDs near the truth (EHC seed 1: ADD 0.049, PROP 0.078 against 0.05, 0.10), but the
penalties, tuned at the population fit's SIGMA, then regularise the correction less, and on vae_ehc.py seed 1 the
recirculating patients' error went from 1.11x to 1.15x the true-structure model's and the others' from 0.92x to
1.02x ODE-only. On mipd_hybrid.py recirculating patients in the AUC window were 48 / 48% on seeds 1 / 2 (at the
population fit's SIGMA 48 / 42-46%) and the 90% PI coverage 87 / 96% (94 / 97%).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import HybridPKError, Interrupted
from ..io import atomic_write_bytes
from ..progress import Progress
from ..solve.device import resolve_device
from .distributed import current_shard
from .features import fit_scale, record_features
from .forms import default_form, get_form
from .objective import BoundError, free_sigma, neg_elbo
from .vae import HybridVAE, scale_to_tensors

__all__ = ["TrainConfig", "train_vae", "held_out_patients", "null_model"]


@dataclass
class TrainConfig:
    """Options of the hybrid's training (defaults validated on held-out EHC patients, seeds 1-5).

    ``form``: how the correction enters (:mod:`hybridpk.residual.forms`): "input", "reservoir",
    "elimination", "log", or "auto": :func:`fit_hybrid` trains the forms that suit the structural model and
    keeps the best predictive score on held-out patients (:func:`train_vae` alone takes input for linear
    models with joint training, else log). ``screen_epochs``: when several candidates (forms, latent
    dimensions) are tried, each is trained this many epochs and only the best continues to the end, exactly
    as if it had been trained alone (0: every candidate to the end). ``intervals``: grid forms' number of
    intervals over the observed span (None: the form's default, 96 input, 48 reservoir).
    ``l2_correction``: weight of the L2 penalty on the correction. ``joint``: re-estimate each patient's
    ETAs (and the typical values) together with z. ``fourier``: Fourier features of the times since dose and
    since the first dose (0: raw times only). No early stopping before ``min_epochs`` (the correction is
    often found only after a plateau), then after ``patience`` epochs without a better held-out -ELBO.
    ``checkpoint``: a file written atomically every ``checkpoint_every`` epochs and when training ends;
    when it exists, training resumes from it (a training that had stopped early is not continued).
    ``its_iterations``: after training, the hybrid's own OMEGA and SIGMA are estimated on the training patients
    by this many iterative two-stage steps (:mod:`hybridpk.residual.omega`; 0: keep the population fit's).
    ``distributed``: data-parallel over the ranks of an initialised torch.distributed process group
    (:mod:`hybridpk.residual.distributed`): each rank takes its share of every minibatch, the gradients are
    summed over the ranks, rank 0 alone shows progress. Every rank holds the same state, so each writes the
    same checkpoint (``hybridpk fit --distributed`` gives the other ranks private copies of RUN: RUN's
    checkpoints are rank 0's) and resumes from it. ``device``: where the networks train ("cpu", "cuda",
    "cuda:N", or "auto": :func:`~hybridpk.solve.device.resolve_device`). ``learn_sigma``: learn the residual
    error SDs with the networks (from the population fit's; FIX ones and those of log-transform-both-sides or a
    general $ERROR stay: :func:`~hybridpk.residual.objective.free_sigma`; the module docstring says why it is
    off by default); False: train at the population fit's.
    """

    latent_dim: int = 2
    hidden: int = 64
    epochs: int = 1500
    lr: float = 3e-3
    batch_size: int = 64
    warmup_epochs: int = 100
    beta: float = 0.3
    l2_correction: float = 0.3
    min_epochs: int = 1000
    val_fraction: float = 0.2
    patience: int = 300
    clip: float = 5.0
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    checkpoint_every: int = 20
    progress: bool = True
    fourier: int = 6
    joint: bool = True
    form: str = "auto"
    intervals: int | None = None
    screen_epochs: int = 300
    its_iterations: int = 1
    distributed: bool = False
    learn_sigma: bool = False


class _Split:
    """The training and held-out patients, moved to the training device, with their ETAs (joint mode: free
    parameters starting at the ODE-only MAP, held whitened (``baseline.whiten``: on the prior's scale, so
    that the optimiser's steps suit an ETA of variance 1e-15 as well as one of 0.1); ``eta_train`` and
    ``eta_val`` give the ETAs themselves)."""

    def __init__(self, batch, ipred, eta0, tr_idx, val_idx, device, baseline=None):
        self.n_val = len(val_idx)
        self.btr, self.ptr = batch.select(tr_idx).to(device), ipred[tr_idx].to(device)
        self.bva = batch.select(val_idx).to(device) if self.n_val else None
        self.pva = ipred[val_idx].to(device) if self.n_val else None
        self.baseline = baseline
        self.etr = self.eva = None
        if baseline is not None:
            u0 = baseline.whiten(eta0.detach()).to(device)
            self.etr = nn.Parameter(u0[tr_idx].clone())
            self.eva = nn.Parameter(u0[val_idx].clone()) if self.n_val else None

    def eta_train(self, rows=None):
        """The training patients' ETAs (all, or those at ``rows``); None without joint ETAs."""
        if self.etr is None:
            return None
        return self.baseline.unwhiten(self.etr if rows is None else self.etr[rows])

    def eta_val(self):
        """The held-out patients' ETAs; None without joint ETAs or held-out patients."""
        return None if self.eva is None else self.baseline.unwhiten(self.eva)


class _Sigma:
    """The residual error SDs training uses: those of kinds ``free`` learnt as log SDs (a parameter of the
    optimiser), the others fixed at ``sd``."""

    def __init__(self, sd: dict, free, device):
        self.fixed = {k: v.detach().to(device) for k, v in sd.items() if k not in free}
        self.free = list(free)
        self.log_sd = (nn.Parameter(torch.log(torch.stack([sd[k].detach().to(device, torch.float64)
                                                             for k in self.free])))
                       if self.free else None)

    @property
    def params(self) -> list:
        return [self.log_sd] if self.log_sd is not None else []

    def current(self, detach: bool = False) -> dict:
        """{kind: 0-d tensor SD} (differentiable in the learnt ones unless ``detach``)."""
        out = dict(self.fixed)
        for j, k in enumerate(self.free):
            out[k] = torch.exp(self.log_sd[j].detach() if detach else self.log_sd[j])
        return out

    def values(self) -> dict:
        """{kind: SD} as floats."""
        return {k: float(v) for k, v in self.current(detach=True).items()}


def _split(n: int, cfg: TrainConfig, gen) -> tuple:
    """(held-out, training) patient indices: ``cfg.val_fraction`` of the ``n`` patients (none with 4 or fewer),
    drawn with ``gen`` (seeded with ``cfg.seed``)."""
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(cfg.val_fraction * n))) if n > 4 else 0
    return perm[:n_val], perm[n_val:]


def held_out_patients(n: int, cfg: TrainConfig):
    """The indices of the patients :func:`train_vae` holds out with ``cfg`` (the same draw, from its seed)."""
    return _split(n, cfg, torch.Generator(device="cpu").manual_seed(cfg.seed))[0]


def _build_model(batch, ipred, tr_idx, cfg: TrainConfig, baseline) -> HybridVAE:
    joint = baseline is not None
    form = cfg.form if cfg.form != "auto" else default_form(joint, joint and baseline.structural.linear)
    intervals = cfg.intervals or get_form(form).intervals
    scale = fit_scale(batch.select(tr_idx), ipred[tr_idx], cfg.fourier, intervals)
    x, _ = record_features(batch.select(tr_idx[:1]), ipred[tr_idx[:1]], scale)
    model = HybridVAE(x.shape[-1], cfg.latent_dim, cfg.hidden, joint, len(baseline.names) if joint else 0,
                      form).double()
    model.scale = scale
    return model


def null_model(batch, ipred, config: TrainConfig, baseline=None) -> HybridVAE:
    """The hybrid without a correction (form "none", ``config.form`` ignored): the ODE model itself, scaled and
    set up as :func:`train_vae` would set up a model of ``config`` (nothing to train)."""
    cfg = replace(config, form="none")
    _, tr_idx = _split(batch.n_subjects, cfg, torch.Generator(device="cpu").manual_seed(cfg.seed))
    model = _build_model(batch, ipred, tr_idx, cfg, baseline)
    model.l2, model.prior_weight = cfg.l2_correction, cfg.beta
    return model.eval()


def train_vae(batch, ipred, error_model, sd, config: TrainConfig | None = None, baseline=None, eta0=None,
              sigma_fixed=()):
    """Train a HybridVAE on a population (``batch`` with the ODE-only individual prediction ``ipred`` (N, R)
    at every record). Joint mode: pass ``baseline`` (an ODEBaseline) and the ODE-only MAP ETAs ``eta0``
    (N, K): each patient's ETAs then start there and are estimated together with the networks (the held-out
    patients' ETAs from their own -ELBO, without training the networks on it), so that the correction learns
    what the ODE cannot explain at its best individual fit rather than at the ODE-only fit, which the
    unexplained structure distorts.

    ``sd``: the residual error SDs {kind: 0-d tensor} of the population fit, where training starts them
    (``config.learn_sigma``; kinds in ``sigma_fixed``, the model's FIX SIGMA, stay).

    Returns (model, history): the model back on the CPU (trained on ``cfg.device``), its ``trained_sd`` the
    residual error SDs {kind: SD} of its kept (best held-out) state; history lists (epoch, train -ELBO per
    patient, validation -ELBO per patient).
    """
    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n = batch.n_subjects
    val_idx, tr_idx = _split(n, cfg, gen)
    n_val = len(val_idx)
    joint = baseline is not None
    if joint and (eta0 is None or eta0.shape != (n, baseline.n_eta)):
        raise ValueError("joint training needs eta0 of shape (N subjects, number of ETAs)")
    model = _build_model(batch, ipred, tr_idx, cfg, baseline)
    if isinstance(error_model, BoundError):      # a general $ERROR's floor at the model's small concentration
        error_model = replace(error_model, c0=model.scale["c0"])
    device = resolve_device(cfg.device)
    model.to(device)
    sigma = _Sigma(sd, free_sigma(error_model, sd, sigma_fixed) if cfg.learn_sigma else [], device)
    data = _Split(batch, ipred, eta0, tr_idx, val_idx, device, baseline)
    opt = torch.optim.Adam(list(model.parameters()) + ([data.etr] if joint else []) + sigma.params, lr=cfg.lr)
    opt_val = torch.optim.Adam([data.eva], lr=cfg.lr) if (joint and n_val) else None
    key = _fingerprint(cfg, batch, ipred, eta0, baseline)
    shard = current_shard(cfg.distributed)
    state = _resume(cfg, model, opt, opt_val, data, sigma, gen, device, key)
    history = state["history"]
    epoch = state["start"]   # the epoch running (0-based), for the message of an interrupt
    try:
        label = "VAE" if cfg.form == "auto" else f"VAE ({cfg.form}, K={cfg.latent_dim})"
        with Progress(cfg.epochs, label, "epoch", enabled=cfg.progress and shard.main, initial=state["start"]) as bar:
            for epoch in range(state["start"], cfg.epochs if not state["stopped"] else state["start"]):
                beta = cfg.beta * min(1.0, (epoch + 1) / max(1, cfg.warmup_epochs))
                train = _train_epoch(model, opt, data, error_model, sigma, beta, cfg, gen, baseline, shard)
                val = _validate(model, opt_val, data, error_model, sigma.current(detach=True), cfg, baseline, train)
                history.append((epoch, train, val))
                bar.update(1, train=f"{train:.3f}", val=f"{val:.3f}")
                state["stopped"] = _track_best(state, model, sigma, epoch, val, cfg)
                last = state["stopped"] or epoch == cfg.epochs - 1
                if cfg.checkpoint and (epoch % max(1, cfg.checkpoint_every) == 0 or last):
                    _save(cfg.checkpoint, model, opt, opt_val, data, sigma, epoch, state, gen, key)
                    state["saved"] = epoch
                if state["stopped"]:
                    break
    except KeyboardInterrupt:
        saved = state.get("saved")
        where = (f"the checkpoint {cfg.checkpoint} holds epoch {saved + 1}" if saved is not None
                 else "no checkpoint was written yet" if cfg.checkpoint else "no checkpoint file was asked for")
        raise Interrupted(f"the VAE training was interrupted in epoch {epoch + 1} of {cfg.epochs}; {where}") from None
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.best_val = state["best"]
    model.trained_sd = dict(state["best_sd"]) if state["best_sd"] is not None else sigma.values()
    model.l2 = cfg.l2_correction     # the per-patient estimates' objective: the training's (beta-)ELBO
    model.prior_weight = cfg.beta
    model.to("cpu")   # trained on cfg.device; inference (per-patient MAP, predictions) runs with the data, on the CPU
    return model, history


def _train_epoch(model, opt, data, error_model, sigma, beta, cfg, gen, baseline, shard=None) -> float:
    """One pass over the training patients in random minibatches; the mean -ELBO per patient. Distributed
    (``shard`` of several ranks): each rank computes its share of every minibatch's patients, with the noise
    drawn for the whole minibatch, and the losses and gradients are summed over the ranks."""
    shard = shard or current_shard(False)
    ntr = data.btr.n_subjects
    order = torch.randperm(ntr, generator=gen)
    params = list(model.parameters()) + ([data.etr] if data.etr is not None else []) + sigma.params
    model.train()
    total = 0.0
    for i in range(0, ntr, cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        noise = torch.randn((len(idx), cfg.latent_dim), generator=gen, dtype=torch.float64)
        mine, noise = shard.take(idx), shard.take(noise)
        loss = None
        if len(mine):
            b = data.btr.select(mine)
            loss, _, _ = neg_elbo(model, b, data.ptr[mine], b.is_obs, error_model, sigma.current(), beta,
                                  cfg.l2_correction, None, baseline, data.eta_train(mine),
                                  noise=noise)
            loss = loss.sum() / len(idx)
        value = shard.all_sum(torch.tensor(0.0 if loss is None else float(loss.detach()), dtype=torch.float64))
        if not torch.isfinite(value):      # NaN guard: skip the step (every rank alike)
            continue
        opt.zero_grad()
        if loss is not None:
            loss.backward()
        shard.sum_gradients(params)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        total += float(value) * len(idx)
    return total / ntr


def _validate(model, opt_val, data, error_model, sd, cfg, baseline, train: float) -> float:
    """The held-out patients' mean -ELBO (z at its mean, no correction penalty); in joint mode their ETAs
    take one step on their own -ELBO (the networks do not learn from it)."""
    model.eval()
    if opt_val is not None:
        vloss = neg_elbo(model, data.bva, data.pva, data.bva.is_obs, error_model, sd, cfg.beta, 0.0, None,
                         baseline, data.eta_val())[0]
        val = float(vloss.detach().mean())
        opt_val.zero_grad()
        (grad,) = torch.autograd.grad(vloss.sum(), [data.eva])
        if bool(torch.isfinite(grad).all()):
            data.eva.grad = grad
            opt_val.step()
        return val
    if not data.n_val:
        return train
    with torch.no_grad():
        return float(neg_elbo(model, data.bva, data.pva, data.bva.is_obs, error_model, sd, cfg.beta, 0.0)[0].mean())


def _track_best(state: dict, model, sigma, epoch: int, val: float, cfg) -> bool:
    """Keep the best held-out state (after warm-up): the networks and the residual error SDs; True when
    training should stop early."""
    if epoch >= cfg.warmup_epochs and val < state["best"] - 1e-6:
        state["best"], state["bad"] = val, 0
        state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["best_sd"] = sigma.values()
    elif epoch >= cfg.warmup_epochs:
        state["bad"] += 1
    return state["bad"] >= cfg.patience and epoch + 1 >= cfg.min_epochs


#: options that do not change what an epoch computes: a checkpoint may be resumed with other values of these
_RESUMABLE_OPTIONS = ("epochs", "min_epochs", "patience", "device", "checkpoint", "checkpoint_every", "progress",
                      "screen_epochs", "distributed")


def _fingerprint(cfg, batch, ipred, eta0, baseline) -> str:
    """SHA-256 of what the training computes from: the options (but ``_RESUMABLE_OPTIONS``), the records, the
    ODE-only predictions, the starting ETAs and the baseline's population values (and how the joint ETAs are
    held: whitened since stop 47, so a checkpoint that held them as they are is not resumed)."""
    import hashlib
    import json
    from dataclasses import asdict

    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_OPTIONS},
                                  sort_keys=True).encode())
    tensors = [batch.time, batch.dv, batch.is_obs, ipred] + ([eta0] if eta0 is not None else [])
    if baseline is not None:
        pop = baseline.population
        tensors += [torch.as_tensor(t.value) for t in pop.theta] + [pop.omega.tensor()]
        h.update(b"joint ETAs whitened")
    for t in tensors:
        h.update(torch.as_tensor(t).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resume(cfg, model, opt, opt_val, data, sigma, gen, device, key: str) -> dict:
    """Training state, from the checkpoint when ``cfg.checkpoint`` exists (loaded with weights_only): the
    networks, optimisers, ETAs, residual error SDs, both random generators, the early-stopping state and the
    history, so that the resumed training computes what the uninterrupted one would have."""
    state = {"start": 0, "best": math.inf, "best_state": None, "best_sd": None, "bad": 0, "stopped": False,
             "history": []}
    if not (cfg.checkpoint and Path(cfg.checkpoint).is_file()):
        return state
    try:
        ck = torch.load(cfg.checkpoint, weights_only=True, map_location=device)
        found = ck.get("fingerprint")
    except Exception as exc:   # unreadable, truncated or holding code: weights_only refuses it
        raise HybridPKError(f"{cfg.checkpoint} is not a hybridpk training checkpoint ({type(exc).__name__}); "
                            "delete it to train from the start") from None
    if found != key:
        raise HybridPKError(f"{cfg.checkpoint} was written by a training of other data or options, or by another "
                            "version of hybridpk (only the number of epochs, early stopping and device may change "
                            "on resume); delete it to train from the start")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if data.etr is not None:
        with torch.no_grad():
            data.etr.copy_(ck["u_train"])
            if data.n_val:
                data.eva.copy_(ck["u_val"])
                opt_val.load_state_dict(ck["optimizer_val"])
    if sigma.log_sd is not None:
        with torch.no_grad():
            sigma.log_sd.copy_(ck["log_sd"])
    if "best_sd" in ck:
        state["best_sd"] = dict(zip(sigma.free + list(sigma.fixed), ck["best_sd"].tolist()))
    state.update(start=int(ck["epoch"]) + 1, best=float(ck["best"]), best_state=ck.get("best_model"),
                 bad=int(ck["bad"]), stopped=bool(ck["stopped"]), saved=int(ck["epoch"]),
                 history=[(int(e), float(t), float(v)) for e, t, v in ck["history"].tolist()])
    gen.set_state(ck["generator"])
    torch.set_rng_state(ck["torch_rng"])
    return state


def _save(path, model, opt, opt_val, data, sigma, epoch: int, state: dict, gen, key: str) -> None:
    """A checkpoint as tensors (and plain numbers and strings) only, written atomically."""
    extra = {"best_model": state["best_state"]} if state["best_state"] else {}
    if sigma.log_sd is not None:
        extra["log_sd"] = sigma.log_sd.detach().clone()
    if state["best_sd"] is not None:
        extra["best_sd"] = torch.tensor([state["best_sd"][k] for k in sigma.free + list(sigma.fixed)],
                                        dtype=torch.float64)
    if data.etr is not None:
        extra["u_train"] = data.etr.detach().clone()      # whitened ETAs (_Split)
        if data.n_val:
            extra.update(u_val=data.eva.detach().clone(), optimizer_val=opt_val.state_dict())
    buf = io.BytesIO()
    history = torch.tensor(state["history"], dtype=torch.float64).reshape(-1, 3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": torch.tensor(epoch),
                "best": torch.tensor(state["best"], dtype=torch.float64), "bad": torch.tensor(state["bad"]),
                "stopped": torch.tensor(bool(state["stopped"])), "history": history, "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "fingerprint": key, "scale": scale_to_tensors(model.scale),
                **extra}, buf)
    atomic_write_bytes(path, buf.getvalue())
