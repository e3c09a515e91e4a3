"""The README's picture: three patients of the bundled enterohepatic-recirculation example, their levels, the
ODE-only fit, the hybrid (1-cmt oral + VAE) and the noise-free true curve (data/ehc_truth.txt), from the
EHC run that ``hybridpk demo`` writes.

Run:  hybridpk demo --out runs/demo && python benchmarks/readme_figure.py runs/demo/ehc docs/hybrid_fit.png
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from hybridpk import load_run, read_nonmem
from hybridpk.data.bundled import bundled_dataset
from hybridpk.solve import simulate
from hybridpk.solve.examples import EHC_TYPICAL


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the demo's EHC run folder")
    ap.add_argument("out", help="the PNG to write")
    args = ap.parse_args()
    path = bundled_dataset("ehc")
    ds = read_nonmem(path)
    truth = pd.read_csv(path.with_name("ehc_truth.txt")).set_index("ID")
    hybrid = load_run(args.run)
    out = hybrid.predict(ds, design=ds.prediction_design(np.linspace(0.1, 24.0, 240), cmt=2))
    with torch.no_grad():
        true = simulate("1cmt_oral_ehc", {k: torch.tensor(truth.loc[list(ds.ids), k].to_numpy())
                                          for k in EHC_TYPICAL}, out.batch).ipred
    on = (out.batch.evid == 2)
    gain = (((out.ode - true) ** 2 * on).sum(1) - ((out.ipred - true) ** 2 * on).sum(1)).numpy()
    rec = truth.loc[list(ds.ids), "RECIRC"].to_numpy() == 1
    # the recirculating patients the correction helps most, and a typical one without recirculation
    picks = list(np.argsort(-np.where(rec, gain, -np.inf))[:2]) + [int(np.flatnonzero(~rec)[0])]
    df = ds.to_dataframe()
    fig = Figure(figsize=(9, 2.8))
    for ax, i in zip(fig.subplots(1, 3), picks):
        sel = on[i].numpy()
        t = out.batch.time[i].numpy()[sel]
        ax.plot(t, true[i].numpy()[sel], color="0.6", lw=3, label="truth")
        ax.plot(t, out.ode[i].numpy()[sel], "b:", lw=1.3, label="ODE only")
        ax.plot(t, out.ipred[i].numpy()[sel], "r-", lw=1.3, label="hybrid")
        p = df[(df.ID == ds.ids[i]) & (df.MDV == 0)]
        ax.plot(p.TIME, p.DV, "ko", ms=3, label="levels")
        ax.set_title(f"ID {ds.ids[i]}" + (" (recirculates)" if rec[i] else " (no recirculation)"), fontsize=9)
        ax.set_xlabel("time (h)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].set_ylabel("concentration (mg/L)", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
