#!/usr/bin/env bash
# One device session: the GPU check, then the README's hybrid fit and a predict with --device cuda.
# Usage on the GPU machine (repo root):  bash benchmarks/gpu_run.sh OUTDIR
set -u
out=${1:-/tmp/gpu_out}; mkdir -p "$out"
PY=${PY:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
nvidia-smi -L
"$PY" -c "import torch, torchdiffeq, scipy, pandas, tqdm, matplotlib; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 300 "$PY" benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.log"
t0=$(date +%s)
timeout 200 "$PY" -m hybridpk fit ehc --model 1cmt_oral --error combined --hybrid vae --device cuda \
    --no-covariance --quiet --out /tmp/run_ehc_cuda 2>&1 | tail -25 | tee "$out/fit_cuda.log"
echo "fit on cuda: $(( $(date +%s) - t0 )) s" | tee -a "$out/fit_cuda.log"
ls /tmp/run_ehc_cuda
"$PY" - <<'PY' 2>&1 | tee -a "$out/fit_cuda.log"
import hybridpk as hp, torch
hyb = hp.load_run("/tmp/run_ehc_cuda")
print("saved on cuda, loaded with weights_only on", next(hyb.vae.parameters()).device)
PY
timeout 60 "$PY" -m hybridpk predict /tmp/run_ehc_cuda data/ehc.csv --out "$out/pred.csv" 2>&1 | tail -5
head -3 "$out/pred.csv"
# the hybrid's predictions and one patient's dose on each device (the same draws: the same answer)
"$PY" -c "import pandas as pd; d = pd.read_csv('data/ehc.csv'); d[d.ID == d.ID.iloc[0]].to_csv('$out/one.csv', index=False)"
for dev in cpu cuda; do
  timeout 120 "$PY" -m hybridpk predict /tmp/run_ehc_cuda data/ehc.csv --device $dev --out "$out/pred_$dev.csv" | tail -1
  timeout 120 "$PY" -m hybridpk dose /tmp/run_ehc_cuda "$out/one.csv" --target auc24=20:40 --dose-step 10 \
      --device $dev --out "$out/dose_$dev.json" | tee "$out/dose_$dev.log" | head -3
done
"$PY" - "$out" <<'PY' 2>&1 | tee -a "$out/fit_cuda.log"
import sys, json, numpy as np, pandas as pd
out = sys.argv[1]
a, g = pd.read_csv(f"{out}/pred_cpu.csv"), pd.read_csv(f"{out}/pred_cuda.csv")
print("hybrid predict cpu against cuda: max relative IPRED difference",
      f"{np.max(np.abs(g.IPRED - a.IPRED) / np.maximum(np.abs(a.IPRED), 1e-12)):.2e}")
da, dg = (json.load(open(f"{out}/dose_{d}.json")) for d in ("cpu", "cuda"))
print("hybrid dose cpu against cuda: same regimen", (da["dose_mg"], da["interval_h"]) == (dg["dose_mg"], dg["interval_h"]))
PY
for dev in cpu cuda; do
  t0=$(date +%s)
  timeout 300 "$PY" -m hybridpk simulate data/theoph.csv --model 1cmt_oral --typical CL=2.8,V=31,KA=1.5 \
      --omega CL=0.1,V=0.04,KA=0.3 --proportional 0.1 --n 200000 --chunk 50000 --device $dev --out "$out/sim_$dev.csv" | tail -1
  echo "simulate --n 200000 on $dev: $(( $(date +%s) - t0 )) s" | tee -a "$out/simulate.log"
done
"$PY" - "$out" <<'PY' 2>&1 | tee -a "$out/simulate.log"
import sys, numpy as np, pandas as pd
out = sys.argv[1]
a, g = pd.read_csv(f"{out}/sim_cpu.csv"), pd.read_csv(f"{out}/sim_cuda.csv")
pa, pg = pd.read_csv(f"{out}/sim_cpu.params.csv"), pd.read_csv(f"{out}/sim_cuda.params.csv")
obs = a.MDV.to_numpy() == 0
rel = np.abs(g.DV.to_numpy()[obs] - a.DV.to_numpy()[obs]) / np.maximum(np.abs(a.DV.to_numpy()[obs]), 1e-12)
print(f"simulate cpu against cuda: same parameters {pa.equals(pg)}, max relative DV difference {rel.max():.2e}")
PY
