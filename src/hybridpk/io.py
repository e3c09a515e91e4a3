"""Safe file output: atomic writes and run metadata (versions, seeds)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_bytes", "run_metadata", "TableWriter"]


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


class TableWriter:
    """A table written chunk by chunk, with bounded memory, then renamed into place: CSV (``.csv``, the header
    once) or Parquet (``.parquet``, one row group per chunk; needs pyarrow, the ``parquet`` extra). Use as a
    context manager: ``with TableWriter(path) as w: w.write(df)``; the file appears at ``path`` only when the
    block ends without an exception (an interrupted run leaves no partial file). Every chunk must have the
    columns of the first, in the same order."""

    def __init__(self, path):
        self.path = Path(path)
        self.kind = "parquet" if self.path.suffix.lower() in (".parquet", ".pq") else "csv"
        if self.kind == "parquet":
            _require_pyarrow(self.path)
        self.rows = 0
        self._tmp = self._fh = self._pq = self._columns = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._fh = os.fdopen(fd, "wb")
        return self

    def write(self, frame) -> None:
        """Append the rows of ``frame`` (a pandas DataFrame)."""
        columns = list(frame.columns)
        if self._columns is None:
            self._columns = columns
        elif columns != self._columns:
            raise ValueError(f"{self.path}: a chunk has columns {columns}, the table has {self._columns}")
        if self.kind == "csv":
            self._fh.write(frame.to_csv(index=False, header=self.rows == 0).encode("utf-8"))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._pq is None:
                self._pq = pq.ParquetWriter(self._fh, table.schema)
            self._pq.write_table(table)
        self.rows += len(frame)

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._pq is not None:
                self._pq.close()
            self._fh.flush()
            if exc_type is None:
                os.fsync(self._fh.fileno())
            self._fh.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        return False


def _require_pyarrow(path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(f"{path}: writing Parquet needs pyarrow (pip install 'hybridpk[parquet]'); or give a "
                          ".csv file") from None


def run_metadata(**extra) -> dict:
    """Versions of hybridpk and its numerical dependencies, plus whatever the run adds (seed, options)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("hybridpk", "torch", "torchdiffeq", "numpy", "scipy", "pandas"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(), **extra}
