"""Padded tensors of a whole population: what the solver and the networks consume.

Layout (N subjects, R records, D dose events after ADDL expansion, C covariates); padding entries have
``*_mask`` False and neutral values (time 0, amount 0) so that they contribute nothing and give no NaN
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

__all__ = ["EventBatch"]

# dose-rate modes (NONMEM RATE semantics)
BOLUS, RATE_GIVEN, DURATION_GIVEN, RATE_MODELLED, DURATION_MODELLED = 0, 1, 2, -1, -2


@dataclass(frozen=True)
class EventBatch:
    """Population records and dose events as padded tensors.

    Record tensors, shape (N, R): ``time`` (h), ``dv``, ``evid``, ``mdv``, ``cmt``, ``is_obs`` (EVID 0 and
    MDV 0), ``record_mask`` (False on padding), ``row`` (0-based position in the Dataset, -1 on padding),
    ``lloq`` (the censoring limit: the LLOQ, or the ULOQ of a level above it; NaN when none), ``cens`` (1 below
    LLOQ, -1 above the ULOQ, 0 otherwise), ``dvid``.

    Covariates: ``cov`` (N, R, C) at each record, ``cov_baseline`` (N, C) at the first record.

    Dose tensors, shape (N, D), ADDL expanded: ``dose_time`` (h), ``dose_amt``, ``dose_cmt`` (0 = model
    default), ``dose_rate`` (amount/h, as given), ``dose_duration`` (h, as given), ``dose_mode`` (0 bolus,
    1 rate given, 2 duration given, -1 rate modelled, -2 duration modelled), ``dose_ss`` (0/1/2),
    ``dose_ii`` (h), ``dose_reset`` (EVID 3/4), ``dose_mask``, ``dose_row``.

    ``occasion``: the covariate that numbers occasions (inter-occasion variability), or None. Set by dosing,
    it makes :meth:`extend` put records after a subject's last record on a new occasion (see there).
    """

    ids: tuple
    covariate_names: tuple
    time: object
    dv: object
    evid: object
    mdv: object
    cmt: object
    is_obs: object
    record_mask: object
    row: object
    lloq: object
    cens: object
    dvid: object
    cov: object
    cov_baseline: object
    dose_time: object
    dose_amt: object
    dose_cmt: object
    dose_rate: object
    dose_duration: object
    dose_mode: object
    dose_ss: object
    dose_ii: object
    dose_reset: object
    dose_mask: object
    dose_row: object
    occasion: str | None = None

    @property
    def n_subjects(self) -> int:
        return len(self.ids)

    def baseline_covariates(self) -> dict:
        """{covariate: (N,) tensor} at each subject's first record (what individual-parameter models take)."""
        return {c: self.cov_baseline[:, k] for k, c in enumerate(self.covariate_names)}

    def last_covariates(self):
        """(N, C) covariates at each subject's last real record (what a forecast carries into the future)."""
        import torch

        r = self.record_mask.shape[1]
        pos = torch.arange(r, device=self.record_mask.device).expand_as(self.record_mask)
        last = torch.where(self.record_mask, pos, torch.zeros_like(pos)).max(1).values
        return self.cov[torch.arange(self.n_subjects, device=last.device), last]

    def ahead_covariates(self):
        """(N, C) covariates of what comes after each subject's last record: the last record's, carried forward,
        with the ``occasion`` (when set) one past the last one (the regimen ahead is a new occasion)."""
        cov = self.last_covariates()
        if self.occasion is not None:
            k = self.covariate_names.index(self.occasion)
            cov = cov.clone()
            cov[:, k] += 1
        return cov

    def _new_record_covariates(self, t_new, ahead: bool):
        """(N, K, C) covariates of records added at times ``t_new`` (K,): :meth:`ahead_covariates`; with an
        ``occasion`` and ``ahead`` False, a time within a subject's records takes the occasion of the first record
        at or after it (the record whose values govern that time under NONMEM's rule)."""
        import torch

        n, k = self.n_subjects, len(t_new)
        cov = self.ahead_covariates().unsqueeze(1).expand(n, k, self.cov_baseline.shape[1])
        if self.occasion is None or ahead or not k:
            return cov
        c = self.covariate_names.index(self.occasion)
        t = torch.as_tensor(t_new, dtype=self.time.dtype, device=self.time.device)
        big = torch.full_like(self.time, float("inf"))
        times = torch.where(self.record_mask, self.time, big)                                   # (N, R)
        later = times.unsqueeze(1) >= t.view(1, k, 1)                                           # (N, K, R)
        first = torch.where(later, torch.arange(times.shape[1], device=t.device).view(1, 1, -1),
                            torch.full_like(later, times.shape[1], dtype=torch.long)).min(-1).values   # (N, K)
        within = first < times.shape[1]
        occ = self.cov[..., c].gather(1, first.clamp(max=times.shape[1] - 1))
        cov = cov.clone()
        cov[..., c] = torch.where(within, occ, cov[..., c])
        return cov

    def time_after_dose(self):
        """(N, R) hours from the most recent dose to each record (TAD, as NONMEM users compute it in their data or
        $PK): from the dose records' times (ALAG not applied), ADDL doses included, a steady-state dose being the
        last of its regimen; a dose at a record's time counts for it when the dose's record comes first in the data
        (the solvers' order, hybridpk.solve._events: a trough written before its dose is at the end of the
        previous interval). NaN before a subject's first dose."""
        import torch

        td, kd = self.dose_time.unsqueeze(1), self.dose_row.unsqueeze(1)
        tr, kr = self.time.unsqueeze(2), self.row.unsqueeze(2)
        given = self.dose_mask.unsqueeze(1) & ((tr > td) | ((tr == td) & (kr >= kd)))     # a dose record: 0
        since = torch.where(given, tr - td, torch.full_like(tr - td, float("inf"))).min(-1).values
        return torch.where(torch.isfinite(since), since, torch.full_like(since, float("nan")))

    def to_rows(self, x) -> np.ndarray:
        """A per-record tensor (N, R) as a numpy array in the Dataset's record order (padding dropped)."""
        m = self.record_mask.cpu()
        return x.detach().cpu()[m].numpy()[self.row[m].cpu().numpy().argsort()]

    def subject_of_rows(self) -> np.ndarray:
        """Position (0..N-1) of the subject of every record, in the Dataset's record order: ``v[...]`` spreads
        a per-subject array ``v`` (N, ...) over the records."""
        m = self.record_mask.cpu().numpy()
        subj = np.broadcast_to(np.arange(m.shape[0])[:, None], m.shape)[m]
        return subj[self.row.cpu().numpy()[m].argsort()]

    def to(self, device=None, dtype=None) -> "EventBatch":
        """Move every tensor to ``device``; float tensors also to ``dtype`` when given."""
        import torch

        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if dtype is not None and v.is_floating_point():
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            out[f.name] = v
        return replace(self, **out)

    def select(self, index) -> "EventBatch":
        """The sub-batch of subjects at positions ``index`` (a list or 1-D tensor of ints)."""
        import torch

        idx = torch.as_tensor(index, dtype=torch.long, device="cpu")
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx.to(v.device)] if isinstance(v, torch.Tensor) else v
        out["ids"] = tuple(self.ids[i] for i in idx.tolist())
        return replace(self, **out)

    def extend(self, regimen=None, times=(), *, keep_records: bool = True, keep_doses: bool = True,
               ahead: bool = False) -> "EventBatch":
        """The same subjects with the doses of ``regimen`` (a :class:`~hybridpk.data.regimen.Regimen`, the same
        for every subject) added and EVID=2 records at ``times`` (h) appended after the existing records, each
        with the covariates of the subject's last record (carried forward: a weight measured during the
        history holds for the forecast): how a forecast continues a patient's history, or how dosing
        evaluates a candidate regimen, without a round trip through the CSV reader.

        ``keep_records=False`` drops the existing records (only the new times remain); ``keep_doses=False``
        drops the existing dose events (the regimen alone). Ordering, as in a dataset sorted by time with dose
        records first: the regimen's record follows every existing record, and the new records follow it, so
        a dose given at a new record's time applies to it. The new records are the last ``len(times)``.

        With an ``occasion`` (IOV), the new records after a subject's last record are on a new occasion (one past
        the last), those within its records on the occasion in force there; ``ahead=True`` puts them all on the
        new occasion (a regimen evaluated on its own time axis, from 0).
        """
        import torch

        t_new = np.asarray(times, dtype=float).reshape(-1)
        n, k = self.n_subjects, len(t_new)
        dt, dev = self.time.dtype, self.time.device
        # row numbers after every existing one: per subject, the regimen's record, then the new records
        first = int(self.row.max()) + 1 if self.row.numel() else 0
        reg_row = first + (k + 1) * torch.arange(n, device=dev).unsqueeze(1)                 # (N, 1)
        new_row = reg_row + 1 + torch.arange(k, device=dev).unsqueeze(0)                     # (N, K)
        like = torch.zeros(n, k, dtype=dt, device=dev)
        new = {"time": torch.as_tensor(t_new, dtype=dt, device=dev).expand(n, k), "dv": like,
               "evid": torch.full((n, k), 2, dtype=torch.long, device=dev),
               "mdv": torch.ones(n, k, dtype=torch.long, device=dev),
               "cmt": torch.zeros(n, k, dtype=torch.long, device=dev),
               "is_obs": torch.zeros(n, k, dtype=torch.bool, device=dev),
               "record_mask": torch.ones(n, k, dtype=torch.bool, device=dev), "row": new_row,
               "lloq": torch.full((n, k), float("nan"), dtype=dt, device=dev),
               "cens": torch.zeros(n, k, dtype=torch.long, device=dev),
               "dvid": torch.zeros(n, k, dtype=torch.long, device=dev),
               "cov": self._new_record_covariates(t_new, ahead)}
        out = {name: (torch.cat([getattr(self, name), v], 1) if keep_records else v) for name, v in new.items()}
        out.update(self._extended_doses(regimen, reg_row, keep_doses))
        return replace(self, **out)

    def _extended_doses(self, regimen, reg_row, keep: bool) -> dict:
        """Dose tensors (N, D) of ``extend``: the existing events (if ``keep``) and the regimen's, in time order."""
        import torch

        names = ("dose_time", "dose_amt", "dose_cmt", "dose_rate", "dose_duration", "dose_mode", "dose_ss",
                 "dose_ii", "dose_reset", "dose_mask", "dose_row")
        n, dt, dev = self.n_subjects, self.time.dtype, self.time.device
        parts = [{name: getattr(self, name) for name in names}] if keep else []
        if regimen is not None:
            ev = regimen.dose_events()
            d = len(ev["time"])

            def each(a, dtype):
                return torch.as_tensor(np.asarray(a), dtype=dtype, device=dev).expand(n, d)

            parts.append({"dose_time": each(ev["time"], dt), "dose_amt": each(ev["amt"], dt),
                          "dose_cmt": each(ev["cmt"], torch.long), "dose_rate": each(ev["rate"], dt),
                          "dose_duration": each(ev["duration"], dt), "dose_mode": each(ev["mode"], torch.long),
                          "dose_ss": each(ev["ss"], torch.long), "dose_ii": each(ev["ii"], dt),
                          "dose_reset": torch.zeros(n, d, dtype=torch.bool, device=dev),
                          "dose_mask": torch.ones(n, d, dtype=torch.bool, device=dev),
                          "dose_row": reg_row.expand(n, d)})
        if not parts:   # no dose at all: one padding slot, as from_dataset keeps
            zero = torch.zeros(n, 1, dtype=dt, device=dev)
            izero = torch.zeros(n, 1, dtype=torch.long, device=dev)
            return {"dose_time": zero, "dose_amt": zero, "dose_cmt": izero, "dose_rate": zero,
                    "dose_duration": zero, "dose_mode": izero, "dose_ss": izero, "dose_ii": zero,
                    "dose_reset": torch.zeros(n, 1, dtype=torch.bool, device=dev),
                    "dose_mask": torch.zeros(n, 1, dtype=torch.bool, device=dev), "dose_row": izero - 1}
        out = {name: torch.cat([p[name] for p in parts], 1) for name in names}
        if len(parts) > 1:   # time order, ties in record order (as Dataset.doses sorts), padding last
            t = torch.where(out["dose_mask"] | out["dose_reset"], out["dose_time"],
                            torch.full_like(out["dose_time"], float("inf")))
            by_row = torch.sort(out["dose_row"], dim=1, stable=True).indices
            order = by_row.gather(1, torch.sort(t.gather(1, by_row), dim=1, stable=True).indices)
            out = {name: v.gather(1, order) for name, v in out.items()}
        return out

    @classmethod
    def from_dataset(cls, ds, dtype=None, device=None, covariates=None) -> "EventBatch":
        import torch

        dtype = dtype or torch.float64
        f = ds.to_dataframe()
        ids = ds.ids
        cov_names = tuple(ds.covariates if covariates is None else covariates)
        ds.require_covariates(cov_names)
        pos = {k: i for i, k in enumerate(ids)}
        subj = np.array([pos[k] for k in f["ID"]])
        n = len(ids)
        counts = np.bincount(subj, minlength=n)
        r = int(counts.max())
        # position of each record within its subject
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        within = np.arange(len(f)) - starts[subj]

        def rec(values, fill, np_dtype=float):
            a = np.full((n, r), fill, dtype=np_dtype)
            a[subj, within] = values
            return a

        col = lambda c, default: f[c].to_numpy(dtype=float) if c in f else np.full(len(f), default)  # noqa: E731
        evid = f["EVID"].to_numpy()
        mdv = f["MDV"].to_numpy()
        is_obs = (evid == 0) & (mdv == 0)
        cens, lloq = ds.censoring()
        dv = f["DV"].to_numpy(dtype=float)
        dv = np.where(np.isnan(dv), 0.0, dv)
        c = len(cov_names)
        cov = np.zeros((n, r, c))
        for j, name in enumerate(cov_names):
            cov[:, :, j] = rec(f[name].to_numpy(dtype=float), 0.0)
        # padding repeats each subject's last covariate value (safe for log/power covariate models)
        last = counts - 1
        for i in range(n):
            cov[i, counts[i]:, :] = cov[i, last[i], :]
        t = lambda a, dt=dtype: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731

        doses = ds.doses()
        dsubj = np.array([pos[k] for k in doses["ID"]], dtype=int)
        dcounts = np.bincount(dsubj, minlength=n)
        dmax = max(int(dcounts.max()) if len(dcounts) else 0, 1)
        dstarts = np.r_[0, np.cumsum(dcounts)[:-1]]
        dwithin = np.arange(len(doses)) - dstarts[dsubj] if len(doses) else np.zeros(0, int)

        def dose(values, fill=0.0, np_dtype=float):
            a = np.full((n, dmax), fill, dtype=np_dtype)
            if len(doses):
                a[dsubj, dwithin] = values
            return a

        rate = doses["RATE"].to_numpy(dtype=float)
        dur = doses["DUR"].to_numpy(dtype=float)
        amt = doses["AMT"].to_numpy(dtype=float)
        mode = np.where(rate > 0, RATE_GIVEN, np.where(rate == -1, RATE_MODELLED,
                        np.where(rate == -2, np.where(dur > 0, DURATION_GIVEN, DURATION_MODELLED), BOLUS)))
        duration = np.where(mode == RATE_GIVEN, amt / np.where(rate > 0, rate, 1.0), np.where(mode == DURATION_GIVEN,
                                                                                                 dur, 0.0))
        rate_eff = np.where(mode == DURATION_GIVEN, amt / np.where(dur > 0, dur, 1.0), np.maximum(rate, 0.0))
        evid_d = doses["EVID"].to_numpy()
        return cls(
            ids=tuple(ids), covariate_names=cov_names,
            time=t(rec(f["TIME"].to_numpy(dtype=float), 0.0)), dv=t(rec(dv, 0.0)),
            evid=t(rec(evid, 0, np.int64), torch.long), mdv=t(rec(mdv, 1, np.int64), torch.long),
            cmt=t(rec(col("CMT", 0).astype(np.int64), 0, np.int64), torch.long),
            is_obs=t(rec(is_obs, False, bool), torch.bool),
            record_mask=t(rec(np.ones(len(f), bool), False, bool), torch.bool),
            row=t(rec(np.arange(len(f)), -1, np.int64), torch.long),
            lloq=t(rec(lloq, np.nan)), cens=t(rec(cens.astype(np.int64), 0, np.int64), torch.long),
            dvid=t(rec(col("DVID", 0).astype(np.int64), 0, np.int64), torch.long),
            cov=t(cov), cov_baseline=t(cov[:, 0, :]),
            dose_time=t(dose(doses["TIME"].to_numpy(dtype=float))), dose_amt=t(dose(amt)),
            dose_cmt=t(dose(doses["CMT"].to_numpy().astype(np.int64), 0, np.int64), torch.long),
            dose_rate=t(dose(rate_eff)), dose_duration=t(dose(duration)),
            dose_mode=t(dose(mode.astype(np.int64), 0, np.int64), torch.long),
            dose_ss=t(dose(doses["SS"].to_numpy().astype(np.int64), 0, np.int64), torch.long),
            dose_ii=t(dose(doses["II"].to_numpy(dtype=float))),
            dose_reset=t(dose(np.isin(evid_d, [3, 4]), False, bool), torch.bool),
            dose_mask=t(dose(evid_d != 3, False, bool), torch.bool),
            dose_row=t(dose(doses["ROW"].to_numpy().astype(np.int64) - 1, -1, np.int64), torch.long),
        )
