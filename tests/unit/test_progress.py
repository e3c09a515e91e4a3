"""Progress output: a bar on a terminal, and in a log a line per 10% (not thousands of redraws)."""

from __future__ import annotations

import io
import re

from hybridpk.progress import Progress


def lines_of(text: str) -> list[str]:
    """Lines as a log viewer shows them: carriage returns (redrawn bars) count as line breaks too."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


def test_a_log_gets_a_line_per_ten_percent_with_the_values():
    out = io.StringIO()
    with Progress(1500, "VAE", "epoch", stream=out) as bar:
        for i in range(1500):
            bar.update(1, train=f"{-i / 100:.3f}")
    lines = lines_of(out.getvalue())
    assert len(lines) == 10
    assert lines[0].startswith("VAE: 10% (150/1500 epoch) train=-1.490") and lines[-1].startswith("VAE: 100%")


def test_an_early_stop_says_where_it_stopped_and_disabled_writes_nothing():
    out = io.StringIO()
    with Progress(300, "FOCE-I", "it", stream=out) as bar:
        for _ in range(22):
            bar.update(1, OFV="116.8034")
    assert lines_of(out.getvalue()) == ["FOCE-I: done (22/300 it) OFV=116.8034"]      # 22 < 10% of 300
    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_a_log_gets_a_line_a_minute_where_ten_percent_takes_longer():
    """A fit of up to 9999 iterations reaches 10% only after 1000 of them: its log still shows, once a minute, how
    far it is and its OFV (here one iteration every 25 s of a clock under the test's control)."""
    now = [0.0]
    out = io.StringIO()
    with Progress(9999, "FOCE", "it", stream=out, clock=lambda: now[0]) as bar:
        for i in range(12):
            now[0] += 25.0
            bar.update(1, OFV=f"{-100.0 - i:.4f}")
    lines = lines_of(out.getvalue())
    assert lines[:4] == ["FOCE: 0% (3/9999 it) OFV=-102.0000", "FOCE: 0% (6/9999 it) OFV=-105.0000",
                         "FOCE: 0% (9/9999 it) OFV=-108.0000", "FOCE: 0% (12/9999 it) OFV=-111.0000"]
    assert lines[4:] == ["FOCE: done (12/9999 it) OFV=-111.0000"]
