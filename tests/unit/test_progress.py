"""Progress output: a bar on a terminal, and in a log a line per 10% (not thousands of redraws)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from hybridpk.progress import Progress
from hybridpk.solve.examples import simulate_ehc_population


def _lines(text: str) -> list[str]:
    """Lines as a log viewer shows them: carriage returns (redrawn bars) count as line breaks too."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


def test_a_log_gets_a_line_per_ten_percent_with_the_values():
    out = io.StringIO()
    with Progress(1500, "VAE", "epoch", stream=out) as bar:
        for i in range(1500):
            bar.update(1, train=f"{-i / 100:.3f}")
    lines = _lines(out.getvalue())
    assert len(lines) == 10
    assert lines[0].startswith("VAE: 10% (150/1500 epoch) train=-1.490") and lines[-1].startswith("VAE: 100%")


def test_an_early_stop_says_where_it_stopped_and_disabled_writes_nothing():
    out = io.StringIO()
    with Progress(300, "FOCE-I", "it", stream=out) as bar:
        for _ in range(22):
            bar.update(1, OFV="116.8034")
    assert _lines(out.getvalue()) == ["FOCE-I: done (22/300 it) OFV=116.8034"]      # 22 < 10% of 300
    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_a_hybrid_fit_writes_few_progress_lines_to_a_log(tmp_path):
    ds, _ = simulate_ehc_population(20, seed=5)
    path = tmp_path / "ehc.csv"
    ds.to_dataframe().to_csv(path, index=False)
    with open(tmp_path / "log.txt", "w") as log:   # stderr is a file, not a terminal
        proc = subprocess.run([sys.executable, "-m", "hybridpk", "fit", str(path), "--model", "1cmt_oral",
                               "--error", "combined", "--hybrid", "vae", "--epochs", "200", "--no-covariance",
                               "--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=log, timeout=600)
    assert proc.returncode == 0
    lines = _lines((tmp_path / "log.txt").read_text())
    assert len(lines) < 100, len(lines)
    assert sum(ln.startswith("VAE: ") for ln in lines) == 10            # 200 epochs: one line per 20
    assert any(ln.startswith("FOCE-I: ") and "OFV=" in ln for ln in lines)
