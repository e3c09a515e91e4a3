"""The installed console script: version speed, manuals, check on real datasets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from hybridpk.cli import build_parser, main


def _script():
    exe = shutil.which("hybridpk", path=str(__import__("pathlib").Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "hybridpk"]


def test_version_is_fast_and_clean():
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(_script() + ["--version"], capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - t0)
        assert proc.returncode == 0 and proc.stdout.startswith("hybridpk ") and proc.stderr == ""
    assert best < 1.0, f"hybridpk --version took {best:.2f} s"


def test_version_does_not_import_torch():
    code = "import sys; from hybridpk.cli import main; main(['--version']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("False")


def test_every_command_has_a_manual_with_an_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "examples:" in top
    for name in sub.choices:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "example" in text and len(text) > 300, name


def test_check_bundled_theoph(capsys):
    assert main(["check", "theoph"]) == 0
    out = capsys.readouterr().out
    assert "subjects       12" in out and "observations   132" in out and "doses          12" in out


def test_check_pheno_and_moxo_json(capsys, pharmpy_examples):
    assert main(["check", str(pharmpy_examples / "pheno.dta"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["subjects"], s["observations"], s["doses"]) == (59, 155, 589)
    assert main(["check", str(pharmpy_examples / "moxo.csv"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["subjects"], s["observations"], s["doses"], s["steady_state_doses"]) == (73, 1006, 142, 69)


def test_check_reads_a_control_streams_data_as_the_stream_does(capsys, pharmpy_examples):
    """check STREAM.mod: its $DATA read as the stream reads it (it read the control stream's text as a CSV and
    listed 'line N has 1 fields'); --covariates with a stream is refused (its $INPUT and code say what is read)."""
    assert main(["check", str(pharmpy_examples / "pheno.mod"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["subjects"], s["observations"], s["doses"]) == (59, 155, 589)
    assert main(["check", str(pharmpy_examples / "pheno.mod"), "--covariates", "WGT"]) == 2
    assert "--columns and --covariates are for data files" in capsys.readouterr().err


def test_demo_runs_and_the_hybrid_beats_ode_only_where_it_should(capsys, tmp_path):
    """The README's main job: theophylline vs nlmixr2, and the hybrid on the bundled EHC example, scored
    against the true curves: clearly better for recirculating patients, no worse for the others."""
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "theoph" in out and "nlmixr2" in out
    assert (tmp_path / "demo" / "theoph" / "summary.json").is_file()
    assert (tmp_path / "demo" / "ehc" / "vae.pt").is_file()
    ratios = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["recirculating"] or parts[:2] == ["not", "recirculating"]:
            ratios[parts[0]] = float(parts[-1])
    assert ratios["recirculating"] < 0.80 and ratios["not"] < 1.10, ratios
    assert "patients flagged COMPLEX" in out and "AUROC of P_COMPLEX for the true flag" in out
    assert "mg every" in out and "probability of 400-600" in out
    page = (tmp_path / "demo" / "ehc" / "report" / "report.html").read_text()
    assert 'alt="latent"' in page and 'alt="vpc"' in page and 'alt="gof"' in page
    assert (tmp_path / "demo" / "ehc" / "classifier.json").is_file()
