"""A pyarrow filesystem that rides out an object-store outage: every call on the wrapped S3
filesystem is retried with backoff for up to ``storage.retry_seconds`` (``infra/retry.py``).

Ray Train's controller writes ``checkpoint_manager_snapshot.json`` through the filesystem it is
given; a plain ``S3FileSystem`` fails the whole run on the first refused connection, and its own
retry strategy is lost when Ray pickles it (apache/arrow#47348; docs/platform.md). This wrapper
is a ``PyFileSystem`` around a picklable handler, so the patience travels with it.

Writes are buffered and uploaded as a whole on ``close`` (retried as a unit: a half-written
object never appears); they are meant for small files (Ray's snapshot, markers). Checkpoints are
copied by ``runs/reporter.py`` through :attr:`PatientHandler.inner` with the same retry.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.infra.retry import Backoff, retry_call

__all__ = ["PatientHandler", "patient"]


class _BufferedUpload(io.RawIOBase):
    def __init__(self, handler: "PatientHandler", path: str, metadata):
        self.handler, self.path, self.metadata, self.buffer = handler, path, metadata, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def close(self) -> None:
        if self.closed:
            return
        body = self.buffer.getvalue()

        def put() -> None:
            with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as out:
                out.write(body)
        self.handler.call(put, f"writing {self.path}")
        super().close()


class PatientHandler(pafs.FileSystemHandler):
    def __init__(self, inner: pafs.FileSystem, retry_seconds: float):
        self.inner, self.retry_seconds = inner, retry_seconds

    def __reduce__(self):
        return PatientHandler, (self.inner, self.retry_seconds)

    def call(self, fn, what: str):
        return retry_call(fn, Backoff(budget=self.retry_seconds), f"storage: {what}")

    def __eq__(self, other) -> bool:
        return isinstance(other, PatientHandler) and self.inner.equals(other.inner)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"patient+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.call(lambda: self.inner.get_file_info(paths), "listing")

    def get_file_info_selector(self, selector):
        return self.call(lambda: self.inner.get_file_info(selector), f"listing {selector.base_dir}")

    def create_dir(self, path: str, recursive: bool) -> None:
        self.call(lambda: self.inner.create_dir(path, recursive=recursive), f"creating {path}")

    def delete_dir(self, path: str) -> None:
        self.call(lambda: self.inner.delete_dir(path), f"deleting {path}")

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.call(lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), f"deleting {path}")

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the root of the storage")

    def delete_file(self, path: str) -> None:
        self.call(lambda: self.inner.delete_file(path), f"deleting {path}")

    def move(self, src: str, dest: str) -> None:
        self.call(lambda: self.inner.move(src, dest), f"moving {src}")

    def copy_file(self, src: str, dest: str) -> None:
        self.call(lambda: self.inner.copy_file(src, dest), f"copying {src}")

    def open_input_stream(self, path: str):
        data = self.call(lambda: self._read(path), f"reading {path}")
        return pa.BufferReader(data)

    def open_input_file(self, path: str):
        return self.open_input_stream(path)

    def _read(self, path: str) -> bytes:
        from orchestrator.infra.storage import read_whole
        return read_whole(self.inner, path)

    def open_output_stream(self, path: str, metadata):
        return pa.PythonFile(_BufferedUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise OSError("append is not supported on object storage")


def patient(fs: pafs.FileSystem, retry_seconds: float) -> pafs.FileSystem:
    """``fs`` wrapped so that each call survives an outage of up to ``retry_seconds``."""
    return pafs.PyFileSystem(PatientHandler(fs, retry_seconds))
