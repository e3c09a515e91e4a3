"""Typed THETA / OMEGA / SIGMA tables of a fitted (or published) population model.

Every value states its scale: THETA on its natural scale (the model's units), OMEGA as variances and
covariances of the ETAs (NONMEM's $OMEGA), SIGMA per residual-error term with an explicit ``scale``: "sd"
(hybridpk's ADD in mg/L and PROP as a fraction) or "variance" (NONMEM's $SIGMA, the variance of EPS). The
SD is what the likelihood uses and is stored; the reported value is derived from it, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ThetaEstimate", "ThetaTable", "OmegaEntry", "OmegaTable", "SigmaEstimate", "SigmaTable"]


def _rse(value: float, se: float | None) -> float | None:
    """Relative standard error (%) as NONMEM tables report it: 100 SE / |estimate|."""
    return 100 * se / abs(value) if se and value else None


@dataclass(frozen=True)
class ThetaEstimate:
    """One THETA: ``value`` on the natural scale (``unit``), its standard error ``se`` (None when not
    computed), ``fixed`` (FIX: not estimated), ``label``: what a control stream's comment calls it where its name
    cannot (``$THETA (0, 14.9) ; CL`` beside a $PK variable CL: THETA_1, labelled CL)."""

    name: str
    value: float
    se: float | None = None
    fixed: bool = False
    unit: str = ""
    label: str = ""

    @property
    def shown(self) -> str:
        """The name with its label, as the printouts show it: "THETA_1 (CL)"."""
        return f"{self.name} ({self.label})" if self.label and self.label != self.name else self.name

    @property
    def rse(self) -> float | None:
        return _rse(self.value, self.se)


class _Rows:
    """Iteration and length over a table's ``rows``."""

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class ThetaTable(_Rows):
    """THETAs in model order; ``table["CL"]`` is the :class:`ThetaEstimate` named CL."""

    rows: tuple

    def __getitem__(self, name: str) -> ThetaEstimate:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no THETA named {name!r}; the model has {', '.join(self.names)}")

    @property
    def names(self) -> tuple:
        return tuple(r.name for r in self.rows)

    def tensors(self, device="cpu") -> dict:
        """{name: 0-d float64 tensor on ``device``}: what the model's parameter map takes."""
        import torch

        return {r.name: torch.tensor(r.value, dtype=torch.float64, device=device) for r in self.rows}

    def to_dict(self) -> dict:
        """summary.json's "parameters": {name: {"estimate", "se", "rse", "fixed"}}."""
        return {r.name: {"estimate": r.value, "se": r.se, "rse": r.rse, "fixed": r.fixed,
                         **({"label": r.label} if r.label else {})} for r in self.rows}


@dataclass(frozen=True)
class OmegaEntry:
    """One diagonal element of OMEGA: the variance of ETA ``eta`` reported as ``label``."""

    label: str
    eta: str
    variance: float
    se: float | None = None

    @property
    def cv_percent(self) -> float | None:
        """CV% of the log-normal individual parameter, sqrt(exp(OMEGA) - 1) x 100 (as nlmixr2 reports it); None
        where that is not a finite number (OMEGA above about 700, which a fit reaches only when the data do
        not determine the variance: the fit warns)."""
        try:
            return 100 * math.sqrt(math.expm1(self.variance))
        except OverflowError:
            return None


@dataclass(frozen=True)
class OmegaTable:
    """The ETAs' covariance matrix. ``etas`` (ETA names), ``labels`` (reported names, e.g. IIV_CL),
    ``matrix`` (K x K variances and covariances), ``se`` (same shape, None where not estimated or not
    computed), ``blocks`` the groups of correlated ETAs (a partition of the indices; covariances are estimated
    within a group only; () or singletons: a diagonal OMEGA)."""

    etas: tuple
    labels: tuple
    matrix: tuple
    se: tuple | None = None
    blocks: tuple = ()

    @property
    def block(self) -> bool:
        """True when some covariances are estimated."""
        return any(len(b) > 1 for b in self.blocks)

    def _index(self, key: str) -> int:
        for i, (e, lab) in enumerate(zip(self.etas, self.labels)):
            if key in (e, lab):
                return i
        raise KeyError(f"no ETA or OMEGA named {key!r}; OMEGA has {', '.join(self.labels)}")

    def __getitem__(self, key: str) -> OmegaEntry:
        i = self._index(key)
        return OmegaEntry(self.labels[i], self.etas[i], self.matrix[i][i], self._se(i, i))

    def __iter__(self):
        return (self[e] for e in self.etas)

    def __len__(self) -> int:
        return len(self.etas)

    def _se(self, i: int, j: int):
        return None if self.se is None else self.se[i][j]

    def covariance(self, a: str, b: str) -> float:
        return self.matrix[self._index(a)][self._index(b)]

    def correlation(self, a: str, b: str) -> float:
        i, j = self._index(a), self._index(b)
        return self.matrix[i][j] / math.sqrt(self.matrix[i][i] * self.matrix[j][j])

    def se_of(self, a: str, b: str) -> float | None:
        """Standard error of the (co)variance element (a, b)."""
        return self._se(self._index(a), self._index(b))

    def tensor(self, device="cpu"):
        """OMEGA (K, K) float64 on ``device``."""
        import torch

        if not self.etas:
            return torch.zeros(0, 0, dtype=torch.float64, device=device)
        return torch.tensor(self.matrix, dtype=torch.float64, device=device)

    def to_dict(self) -> dict:
        """summary.json's "omega": {label: {"variance", "se", "cv_percent", "eta"}}."""
        return {e.label: {"variance": e.variance, "se": e.se, "cv_percent": e.cv_percent, "eta": e.eta} for e in self}

    def covariances_to_dict(self) -> dict:
        """summary.json's "omega_covariance": {"ETA_A,ETA_B": {"covariance", "se", "correlation"}} for each
        estimated covariance (pairs within a block, below the diagonal)."""
        out = {}
        for b in self.blocks:
            for i, r in enumerate(b):
                for c in b[:i]:
                    out[f"{self.etas[c]},{self.etas[r]}"] = {"covariance": self.matrix[r][c], "se": self._se(r, c),
                                                             "correlation": self.correlation(self.etas[r],
                                                                                             self.etas[c])}
        return out


@dataclass(frozen=True)
class SigmaEstimate:
    """One residual-error term. ``kind`` "ADD" (additive, concentration units) or "PROP" (proportional,
    fraction of the prediction); ``sd`` its standard deviation and ``se_sd`` the SE of that SD; ``label``
    and ``scale`` how it is reported: ``value`` is the SD (scale "sd") or the variance (scale "variance",
    NONMEM's $SIGMA), and ``se`` its standard error on the same scale (delta method)."""

    kind: str
    label: str
    sd: float
    se_sd: float | None = None
    scale: str = "sd"

    @property
    def variance(self) -> float:
        return self.sd * self.sd

    @property
    def value(self) -> float:
        return self.sd if self.scale == "sd" else self.variance

    @property
    def se(self) -> float | None:
        if self.se_sd is None:
            return None
        return self.se_sd if self.scale == "sd" else 2 * self.sd * self.se_sd


@dataclass(frozen=True)
class SigmaTable(_Rows):
    """Residual-error terms; ``table["ADD"]`` by label or kind."""

    rows: tuple

    def __getitem__(self, key: str) -> SigmaEstimate:
        for r in self.rows:
            if key == r.label:
                return r
        for r in self.rows:
            if key == r.kind:
                return r
        raise KeyError(f"no SIGMA named {key!r}; the model has {', '.join(r.label for r in self.rows)}")

    def sd_tensors(self, device="cpu") -> dict:
        """{kind: 0-d float64 tensor SD on ``device``}: what the error model's likelihood takes."""
        import torch

        return {r.kind: torch.tensor(r.sd, dtype=torch.float64, device=device) for r in self.rows}

    def to_dict(self) -> dict:
        """summary.json's "sigma": {label: {"estimate", "se", "scale", "sd", "variance", "kind"}}."""
        return {r.label: {"estimate": r.value, "se": r.se, "scale": r.scale, "sd": r.sd, "variance": r.variance,
                          "kind": r.kind} for r in self.rows}
