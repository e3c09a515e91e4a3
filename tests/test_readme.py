"""The README's Python example (fit -> load_run -> predict -> estimate a new patient -> dose) runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    return blocks[0]


def test_readme_example_is_short_and_runs(tmp_path):
    code = _first_python_block()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) < 15, f"the README example has {len(lines)} lines"
    for step in ("fit_population", "load_run", ".predict(", ".estimate(", "recommend_dose"):
        assert step in code, step
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "theoph" / "model.json").is_file()
