"""OMEGA as blocks: which ETAs are correlated, and the unconstrained parametrisation the estimation uses.

A block structure is a partition of the ETA indices (``((0, 1), (2,))``: ETA 1 and 2 correlated, ETA 3
alone), as NONMEM's ``$OMEGA BLOCK(n)`` records and diagonal ``$OMEGA`` records define it. The estimation
works on an unconstrained vector: first one entry per ETA (in ETA order: log of the variance for an ETA
alone, log of the Cholesky factor's diagonal for one in a block), then, block by block, the strictly lower
triangle of each block's Cholesky factor (row by row). Every OMEGA it gives is positive definite.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["normalise_blocks", "OmegaBlocks"]


def normalise_blocks(blocks, k: int) -> tuple:
    """A partition of range(k): the given blocks (sorted, each sorted) plus the remaining ETAs alone."""
    seen = sorted(i for b in blocks for i in b)
    if len(seen) != len(set(seen)) or any(i < 0 or i >= k for i in seen):
        raise ValueError(f"OMEGA blocks {blocks!r} must be disjoint sets of ETA indices 0..{k - 1}")
    out = [tuple(sorted(b)) for b in blocks if len(b)] + [(i,) for i in range(k) if i not in seen]
    return tuple(sorted(out, key=lambda b: b[0]))


class OmegaBlocks:
    """The parametrisation of an OMEGA with the block structure ``blocks`` (a partition of range(k))."""

    def __init__(self, blocks, k: int):
        self.k = k
        self.blocks = normalise_blocks(blocks, k)
        self.multi = [b for b in self.blocks if len(b) > 1]

    @property
    def n_params(self) -> int:
        return self.k + sum(len(b) * (len(b) - 1) // 2 for b in self.multi)

    def offdiagonal(self) -> list:
        """(row, column) of the estimated covariances, in the order of the parameters (row > column)."""
        out = []
        for b in self.multi:
            r, c = np.tril_indices(len(b), -1)
            out += [(b[i], b[j]) for i, j in zip(r, c)]
        return out

    def param_indices(self, block) -> list:
        """Positions in the unconstrained vector of the parameters of ``block`` (one of ``blocks``): its ETAs'
        diagonal entries in ETA order, then its Cholesky factor's strictly lower triangle (row by row). Two
        blocks of one size list corresponding parameters in the same order (how SAME ties them)."""
        block = tuple(block)
        out = list(block)
        i = self.k
        for b in self.multi:
            n_off = len(b) * (len(b) - 1) // 2
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
            for i, j in zip(*np.tril_indices(len(b), -1)):
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
            m = len(b)
            n_off = m * (m - 1) // 2
            rows, cols = torch.tril_indices(m, m, offset=-1)
            bi = torch.tensor(b, device=x.device)
            chol = torch.diag(torch.exp(diag[bi])).index_put((rows, cols), x[i:i + n_off])
            i += n_off
            rr, cc = torch.meshgrid(bi, bi, indexing="ij")
            omega = omega.index_put((rr.reshape(-1), cc.reshape(-1)), (chol @ chol.T).reshape(-1))
        return omega
