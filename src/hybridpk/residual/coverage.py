"""What a hybrid's training data covered (doses, dosing intervals, time span, latent values), so that a
forecast or a dose for a new patient says when it extrapolates beyond it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .features import dose_gaps

__all__ = ["TrainingCoverage"]


@dataclass(frozen=True)
class TrainingCoverage:
    """The training design: dose amounts ``dose_min``-``dose_max`` (mg), intervals between a patient's
    successive doses ``interval_min``-``interval_max`` (h; None: single doses only), ``span_h`` (the latest
    observation, h after the patient's first dose), ``max_doses`` per patient, ``z_norm2_q99`` (the 99th
    percentile of the training patients' |z|^2, refined latent means), and the trained latent distribution
    ``z_mean`` (K,), ``z_cov`` (K, K): the aggregate posterior of the training patients,
    mean_i N(z_i, diag(z_sd_i^2)) matched by its first two moments (Makhzani et al. 2016, "aggregated
    posterior"), the prior of z a new patient's posterior uses. The correction was learnt only on this
    design; the ODE part extrapolates as a compartmental model does, the correction may not."""

    dose_min: float
    dose_max: float
    interval_min: float | None
    interval_max: float | None
    span_h: float
    max_doses: int
    z_norm2_q99: float
    z_mean: tuple | None = None
    z_cov: tuple | None = None

    @classmethod
    def from_training(cls, batch, z, z_sd=None) -> "TrainingCoverage":
        """From the training EventBatch, the training patients' latent means ``z`` (N, K) and the encoder's SDs
        ``z_sd`` (N, K)."""
        given = batch.dose_mask & (batch.dose_amt > 0)
        amt = batch.dose_amt[given]
        t = torch.where(given, batch.dose_time, torch.full_like(batch.dose_time, float("inf")))
        gaps = dose_gaps(batch)
        first = t.min(1).values
        obs_t = torch.where(batch.is_obs, batch.time, torch.full_like(batch.time, -float("inf"))).max(1).values
        span = (obs_t - first)[torch.isfinite(obs_t - first)]
        q99 = float(torch.quantile((z * z).sum(1), 0.99)) if z.shape[0] else float("inf")
        mean = cov = None
        if z.shape[0] >= 2:
            m = z.mean(0)
            c = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
            if z_sd is not None:
                c = c + torch.diag((z_sd ** 2).mean(0))
            mean = tuple(float(v) for v in m)
            cov = tuple(tuple(float(v) for v in row) for row in c)
        return cls(dose_min=float(amt.min()) if amt.numel() else 0.0, dose_max=float(amt.max()) if amt.numel() else 0.0,
                   interval_min=float(gaps.min()) if gaps.numel() else None,
                   interval_max=float(gaps.max()) if gaps.numel() else None,
                   span_h=float(span.max()) if span.numel() else 0.0, max_doses=int(given.sum(1).max()),
                   z_norm2_q99=q99, z_mean=mean, z_cov=cov)

    def latent_prior(self, device="cpu"):
        """(mean (K,), covariance (K, K)) tensors of the trained latent distribution on ``device``, or None."""
        if self.z_mean is None:
            return None
        return (torch.tensor(self.z_mean, dtype=torch.float64, device=device),
                torch.tensor(self.z_cov, dtype=torch.float64, device=device))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainingCoverage | None":
        if not d:
            return None
        d = dict(d)
        if d.get("z_mean") is not None:
            d["z_mean"], d["z_cov"] = tuple(d["z_mean"]), tuple(tuple(r) for r in d["z_cov"])
        return cls(**d)

    def latent_warnings(self, z) -> list[str]:
        """A warning when a patient's latent mean ``z`` (K,) lies beyond the training patients' 99th percentile
        of |z|^2."""
        n2 = float((z * z).sum())
        if n2 > self.z_norm2_q99:
            return [f"the patient's latent z (|z|^2 = {n2:.2f}) lies outside the training patients' latent values "
                    f"(99th percentile {self.z_norm2_q99:.2f}): the hybrid's correction extrapolates for this "
                    "patient; compare with the ODE-only forecast"]
        return []

    def design_warnings(self, doses=(), intervals=(), until_h: float | None = None, n_doses: int | None = None
                        ) -> list[str]:
        """Warnings for a regimen or forecast beyond the training design: doses (mg) outside the training
        range, intervals (h) outside the training intervals, a time ``until_h`` (h after the patient's first
        dose) beyond the training span, more doses than any training patient had."""
        out = []
        bad = [d for d in doses if not self.dose_min * (1 - 1e-9) <= d <= self.dose_max * (1 + 1e-9)]
        if bad:
            out.append(f"dose(s) {', '.join(f'{d:g}' for d in sorted(set(bad)))} mg lie outside the doses the hybrid "
                       f"was trained on ({self.dose_min:g}-{self.dose_max:g} mg): its correction extrapolates")
        if intervals:
            if self.interval_min is None:
                out.append("the hybrid was trained on single doses only: its correction after repeated doses "
                           "extrapolates")
            else:
                lo, hi = self.interval_min * (1 - 1e-9), self.interval_max * (1 + 1e-9)
                bad = sorted({t for t in intervals if not lo <= t <= hi})
                if bad:
                    out.append(f"interval(s) {', '.join(f'{t:g}' for t in bad)} h lie outside the dosing "
                               f"intervals the hybrid was trained on ({self.interval_min:g}-{self.interval_max:g} h): "
                               "its correction extrapolates")
        if until_h is not None and until_h > self.span_h * (1 + 1e-9):
            out.append(f"the prediction reaches {until_h:g} h after the first dose, beyond the training data's "
                       f"{self.span_h:g} h: the hybrid's correction extrapolates in time")
        if n_doses is not None and n_doses > self.max_doses:
            out.append(f"{n_doses} doses in all, more than any training patient had ({self.max_doses}): the "
                       "hybrid's correction extrapolates")
        return out
