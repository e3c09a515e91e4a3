"""Progress of long loops (FOCE-I iterations, VAE epochs): a live bar on a terminal, a few lines in a log.

On a terminal (stderr is a TTY) a tqdm bar is redrawn in place. Anywhere else (a log file, a pipe, CI) a
redrawn bar would write thousands of carriage-return updates, so one line is written each time another
10% of the total is done, with the current values (e.g. the OFV), plus one closing line; and where 10% takes long
(pharmpy's moxo.mod: an iteration a minute, so 10% of 300 iterations took half an hour), a line at least every
:data:`QUIET_SECONDS`, so that a log shows the fit is alive and where its OFV is.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]

#: in a log, the longest time between two lines while steps are being done (s)
QUIET_SECONDS = 60.0


class Progress:
    """``Progress(total, "VAE", "epoch")``; ``update(1, train=..., val=...)`` per step; ``close()`` at the end
    (or use it as a context manager). ``enabled=False`` makes every call a no-op."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool = True, initial: int = 0,
                 stream=None, clock=time.monotonic):
        self.total, self.desc, self.unit = max(int(total), 1), desc, unit
        self.done = int(initial)
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self._postfix: dict = {}
        self._bar = None
        self._next_decile = self._decile(self.done) + 1
        self._clock = clock
        self._last_line = clock()
        if self.enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, leave=False,
                             mininterval=1.0, file=self.stream)

    def _decile(self, done: int) -> int:
        return (10 * done) // self.total

    def update(self, n: int = 1, **postfix) -> None:
        if not self.enabled:
            return
        self.done += n
        self._postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix)
            return
        if self._decile(self.done) >= self._next_decile:
            self._next_decile = self._decile(self.done) + 1
            self._line(f"{min(100, 100 * self.done // self.total)}%")
        elif self._clock() - self._last_line >= QUIET_SECONDS:
            self._line(f"{100 * self.done // self.total}%")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done < self.total:   # stopped early (converged, early stopping): say where
            self._line("done")
        self.enabled = False

    def _line(self, what: str) -> None:
        values = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        print(f"{self.desc}: {what} ({self.done}/{self.total} {self.unit}){' ' + values if values else ''}",
              file=self.stream, flush=True)
        self._last_line = self._clock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
