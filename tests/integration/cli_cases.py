"""Runs CLI cases, each in its own process, as the ``hybridpk`` command runs them (``sys.exit(main(argv))``).

Reads a JSON list of argument lists on stdin and prints a JSON list of {"code", "stdout", "stderr"}. The
heavy imports (torch, pandas, the library) are made once; each case then runs in a forked child with its own
standard streams, so that a case cannot see another's state, an uncaught exception prints its traceback and
exits 1 as the command would, and 40 cases cost seconds instead of 40 interpreter starts. Used by
``test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def _child(argv) -> int:
    from hybridpk.cli import main

    try:
        return int(main(argv) or 0)
    except SystemExit as exc:          # argparse refusals: exit 2, as from the command
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:              # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        return 1


def run_case(argv) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            code = _child(argv)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"code": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read()}


def main() -> None:
    import hybridpk.cli  # noqa: F401  -- the imports every command makes, once
    import hybridpk.dosing  # noqa: F401
    import hybridpk.residual  # noqa: F401

    cases = json.load(sys.stdin)
    real_stdout = sys.stdout
    results = [run_case(argv) for argv in cases]
    real_stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
