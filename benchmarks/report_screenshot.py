"""Open a run's HTML report in a real headless browser (Debian's chromium) and save a screenshot, to see that
the figures are laid out (issue 18's acceptance). Fits theophylline (1-cmt oral, default options), writes its
report, and runs ``chromium --headless --screenshot``.

Run:  python benchmarks/report_screenshot.py [--out report_screenshot] [--browser chromium]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import warnings
from pathlib import Path


def screenshot(html: Path, png: Path, browser: str = "chromium", height: int = 6000) -> Path:
    """Render ``html`` headless into ``png`` (1200 px wide); raises when the browser is missing or fails."""
    exe = shutil.which(browser)
    if exe is None:
        raise SystemExit(f"{browser} not found (Debian: apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1200,{height}",
           f"--screenshot={png.resolve()}", html.resolve().as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or not png.is_file():
        raise SystemExit(f"{browser} failed ({run.returncode}): {run.stderr[-2000:]}")
    return png


def main() -> None:
    import hybridpk as hp
    from hybridpk.report import write_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="report_screenshot")
    ap.add_argument("--browser", default="chromium")
    a = ap.parse_args()
    out = Path(a.out)
    ds = hp.read_nonmem(hp.bundled_dataset("theoph"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.fit_population(hp.build_model("1cmt_oral", error="combined"), ds, progress=False)
    fit.save(out / "run")
    html = write_report(out / "run", ds, out / "report")
    png = screenshot(html, out / "report.png", a.browser)
    print(f"report {html}; screenshot {png} ({png.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
