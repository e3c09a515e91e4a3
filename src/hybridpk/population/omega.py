"""OMEGA as blocks: which ETAs are correlated, and the unconstrained parametrisation the estimation uses.

A block structure is a partition of the ETA indices (``((0, 1), (2,))``: ETA 1 and 2 correlated, ETA 3
alone), as NONMEM's ``$OMEGA BLOCK(n)`` records and diagonal ``$OMEGA`` records define it. The estimation
works on an unconstrained vector: first one entry per ETA (in ETA order: log of the variance for an ETA
alone, log of the Cholesky factor's diagonal for one in a block), then, block by block, the strictly lower
triangle of each block's Cholesky factor (row by row). Every OMEGA it gives is positive definite.

A banded block (NONMEM's ``$OMEGA BLOCK(n)`` with covariances given as 0, which NONMEM holds at 0; nmusers,
D. Mould, 2001-03-23 "Re: Rounding errors") has ``zeros``: pairs of ETA indices (row > column) whose covariance is
0. Each row's zeros must lead it (the columns of the block before its first estimated covariance): then the
Cholesky factor has its zeros in the same places, so those entries are left out of the parameters, and the
covariances are exactly 0 for every parameter value (each term of their sum has a zero factor).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["normalise_blocks", "lower_pairs", "band_zeros_problem", "OmegaBlocks"]


def normalise_blocks(blocks, k: int) -> tuple:
    """A partition of range(k): the given blocks (sorted, each sorted) plus the remaining ETAs alone."""
    seen = sorted(i for b in blocks for i in b)
    if len(seen) != len(set(seen)) or any(i < 0 or i >= k for i in seen):
        raise ValueError(f"OMEGA blocks {blocks!r} must be disjoint sets of ETA indices 0..{k - 1}")
    out = [tuple(sorted(b)) for b in blocks if len(b)] + [(i,) for i in range(k) if i not in seen]
    return tuple(sorted(out, key=lambda b: b[0]))


def lower_pairs(zeros) -> set:
    """The pairs of ETA indices ``zeros`` as (row, column) below the diagonal."""
    return {(max(r, c), min(r, c)) for r, c in zeros}


def band_zeros_problem(blocks, zeros) -> str | None:
    """Why the covariances ``zeros`` (pairs of ETA indices) cannot be held at 0 in ``blocks``, or None: each pair
    must lie in one block, and each row's zeros must lead it (see the module docstring)."""
    where = {e: (b, i) for b in blocks for i, e in enumerate(b)}
    pairs = lower_pairs(zeros)
    for r, c in sorted(pairs):
        if r == c or r not in where or c not in where or where[r][0] != where[c][0]:
            return f"the covariance of ETA indices {c} and {r} is not inside one OMEGA block"
    for b in blocks:
        for i in range(1, len(b)):
            held = [(b[i], b[j]) in pairs for j in range(i)]
            if any(held) and held != sorted(held, reverse=True):
                return (f"the zeros in row {i + 1} of the block of ETA indices {list(b)} do not lead the row (a "
                        "band: the covariances held at 0 must come before the estimated ones)")
    return None


class OmegaBlocks:
    """The parametrisation of an OMEGA with the block structure ``blocks`` (a partition of range(k)) and the
    covariances ``zeros`` held at 0 (see the module docstring)."""

    def __init__(self, blocks, k: int, zeros=()):
        self.k = k
        self.blocks = normalise_blocks(blocks, k)
        self.multi = [b for b in self.blocks if len(b) > 1]
        problem = band_zeros_problem(self.blocks, zeros)
        if problem:
            raise ValueError(problem)
        self.zeros = lower_pairs(zeros)
        #: per block of several ETAs, the positions (i, j) (i > j, row by row) of its Cholesky factor's estimated
        #: entries
        self._lower_of = {b: [(int(i), int(j)) for i, j in zip(*np.tril_indices(len(b), -1))
                              if (b[i], b[j]) not in self.zeros] for b in self.multi}

    @property
    def n_params(self) -> int:
        return self.k + sum(len(self._lower_of[b]) for b in self.multi)

    def offdiagonal(self) -> list:
        """(row, column) of the estimated covariances, in the order of the parameters (row > column)."""
        return [(b[i], b[j]) for b in self.multi for i, j in self._lower_of[b]]

    def param_indices(self, block) -> list:
        """Positions in the unconstrained vector of the parameters of ``block`` (one of ``blocks``): its ETAs'
        diagonal entries in ETA order, then its Cholesky factor's strictly lower triangle (row by row). Two
        blocks of one size list corresponding parameters in the same order (how SAME ties them)."""
        block = tuple(block)
        out = list(block)
        i = self.k
        for b in self.multi:
            n_off = len(self._lower_of[b])
            if b == block:
                out += list(range(i, i + n_off))
            i += n_off
        return out

    def x0(self, init) -> list:
        """Unconstrained start from initial variances (ETA order; covariances 0) or a full (K, K) matrix."""
        init = np.asarray(init, dtype=float)
        matrix = init if init.ndim == 2 else np.diag(init)
        diag = list(np.log(np.diag(matrix))) if self.k else []
        off = []
        for b in self.multi:
            if init.ndim == 2:
                chol = np.linalg.cholesky(matrix[np.ix_(b, b)])
            else:
                chol = np.diag(np.sqrt(np.diag(matrix)[list(b)]))
            for i, j in self._lower_of[b]:
                off.append(float(chol[i, j]))
            for i, e in enumerate(b):
                diag[e] = float(np.log(chol[i, i]))
        return diag + off

    def unpack(self, x):
        """OMEGA (K, K) from the unconstrained parameters ``x`` (n_params,)."""
        k = self.k
        if not k:
            return torch.zeros(0, 0, dtype=x.dtype, device=x.device)
        diag = x[:k]
        if not self.multi:
            return torch.diag(torch.exp(diag))
        omega = torch.zeros(k, k, dtype=x.dtype, device=x.device)
        singles = [b[0] for b in self.blocks if len(b) == 1]
        if singles:
            idx = torch.tensor(singles, device=x.device)
            omega = omega.index_put((idx, idx), torch.exp(diag[idx]))
        i = k
        for b in self.multi:
            lower = self._lower_of[b]
            n_off = len(lower)
            rows = torch.tensor([i for i, _ in lower], dtype=torch.long, device=x.device)
            cols = torch.tensor([j for _, j in lower], dtype=torch.long, device=x.device)
            bi = torch.tensor(b, device=x.device)
            chol = torch.diag(torch.exp(diag[bi])).index_put((rows, cols), x[i:i + n_off])
            i += n_off
            rr, cc = torch.meshgrid(bi, bi, indexing="ij")
            omega = omega.index_put((rr.reshape(-1), cc.reshape(-1)), (chol @ chol.T).reshape(-1))
        return omega
