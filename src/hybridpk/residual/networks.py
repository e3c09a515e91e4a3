"""Encoder q(z | patient) over a set of irregular samples (deep sets), and the latent-conditioned decoder."""

from __future__ import annotations

import torch
from torch import nn


def mlp(n_in, n_hidden, n_out, layers=2):
    mods, d = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(d, n_hidden), nn.SiLU()]
        d = n_hidden
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


class SetEncoder(nn.Module):
    """Permutation-invariant encoder: phi on each observation (its record features, log DV - log IPRED),
    masked mean over the patient's observations plus log(count), then rho -> (mu, log sigma^2) of z."""

    def __init__(self, n_features: int, latent_dim: int, hidden: int = 64):
        super().__init__()
        self.phi = mlp(n_features + 2, hidden, hidden)
        self.rho = mlp(hidden + 1, hidden, 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x, resid, mask):
        """x (N, R, F) record features, resid (N, R) log-residuals, mask (N, R) observations."""
        m = mask.to(x.dtype).unsqueeze(-1)
        h = self.phi(torch.cat([x, resid.unsqueeze(-1), torch.ones_like(resid).unsqueeze(-1)], -1)) * m
        count = m.sum(1).clamp(min=1.0)
        pooled = h.sum(1) / count
        out = self.rho(torch.cat([pooled, torch.log(count)], -1))
        mu, logvar = out.split(self.latent_dim, -1)
        return mu, logvar.clamp(-10.0, 5.0)


class CorrectionDecoder(nn.Module):
    """g(z, features) per record or grid point, the output of a correction form: the log correction r(t)
    (log form), the scaled input rate (input form) or the log release rate (reservoir form)."""

    def __init__(self, n_features: int, latent_dim: int, hidden: int = 64):
        super().__init__()
        self.net = mlp(n_features + latent_dim, hidden, 1)
        nn.init.zeros_(self.net[-1].weight)   # start at the ODE baseline (r = 0, or no input)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z, x):
        zz = z.unsqueeze(1).expand(-1, x.shape[1], -1)
        return self.net(torch.cat([x, zz], -1)).squeeze(-1)
