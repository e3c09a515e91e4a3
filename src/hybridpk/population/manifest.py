"""A run folder's manifest: which files the run consists of, with their sizes and SHA-256, so that loading
can refuse a missing, truncated, edited or foreign file by name (written last and atomically by every save)."""

from __future__ import annotations

from pathlib import Path

from ..errors import HybridPKError
from ..io import atomic_write_text

__all__ = ["write_manifest", "read_manifest", "RUN_MANIFEST"]

#: manifest.json of a run folder: "format" and "version" this hybridpk writes and reads
RUN_MANIFEST = ("hybridpk-run", 1)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(run_dir, names) -> Path:
    """Write ``manifest.json`` into ``run_dir``: the run's format version and, for each of the files ``names``
    (in the folder), its size and SHA-256, so that loading can tell a missing, truncated, edited or foreign
    file by name. Written last and atomically: a run whose save was interrupted has no manifest (or the
    previous one), and is refused rather than half read."""
    import json

    run = Path(run_dir)
    files = {n: {"bytes": (run / n).stat().st_size, "sha256": _sha256(run / n)} for n in sorted(set(names))}
    return atomic_write_text(run / "manifest.json", json.dumps({"format": RUN_MANIFEST[0], "version": RUN_MANIFEST[1],
                                                                 "files": files}, indent=2))


def read_manifest(run_dir, verify: bool = True) -> dict:
    """The files {name: {bytes, sha256}} of the run in ``run_dir``, each checked against its manifest entry
    (``verify=False``: the listing only). Raises HybridPKError naming the problem: no or a damaged
    manifest.json, a listed file missing, or one whose size or hash differs (truncated, edited or replaced
    since hybridpk wrote it)."""
    import json

    run = Path(run_dir)
    path = run / "manifest.json"
    if not path.is_file():
        raise HybridPKError(f"{run} has no manifest.json: it was not written (completely) by this version of "
                            "hybridpk (an interrupted save, an older version, or another program); refit the model")
    try:
        data = json.loads(path.read_text())
        ok = (data.get("format"), data.get("version")) == RUN_MANIFEST and isinstance(data.get("files"), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise HybridPKError(f"{path} is damaged or not a hybridpk run manifest (format {RUN_MANIFEST[0]!r} "
                            f"version {RUN_MANIFEST[1]}); refit the model")
    if not verify:
        return data["files"]
    for name, entry in data["files"].items():
        f = run / name
        if not f.is_file():
            raise HybridPKError(f"{f} is missing: the run lists it in manifest.json; restore it or refit the model")
        try:
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            raise HybridPKError(f"{path} is damaged (entry of {name}); refit the model") from None
        if f.stat().st_size != size or _sha256(f) != digest:
            raise HybridPKError(f"{f} has changed since hybridpk wrote it ({f.stat().st_size} bytes, manifest "
                                f"{size}; SHA-256 differs): truncated, edited or replaced; restore it or refit the "
                                "model")
    return data["files"]
