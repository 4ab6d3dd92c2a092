"""Where runs live: a local directory or ``s3://bucket/prefix`` on any S3-compatible endpoint.

pyarrow's ``S3FileSystem()`` ignores ``AWS_ENDPOINT_URL`` (apache/arrow#49643; docs/platform.md),
so the endpoint is always passed explicitly: ``storage.endpoint`` or, failing that, the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables. Credentials are never put in the
filesystem object or any config: pyarrow resolves them from the standard AWS variables or an
instance role on each node.

Layout of a run ``NAME`` under ``storage.path``::

    NAME/checkpoint_manager_snapshot.json   Ray Train's resume index
    NAME/step_00000200/state.pt             checkpoints (Ray Train checkpoint dirs)
    NAME/denoiselab/config.yaml             the resolved config of the run
    NAME/denoiselab/artifacts/...           sample grids, plots
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from orchestrator.infra.retry import first_line
from trainers.errors import UserError

__all__ = ["StorageError", "Storage", "open_storage", "read_whole", "endpoint_from_env", "CREDENTIAL_VARS", "SECRET_VARS",
           "ENDPOINT_VARS"]

SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN")
ENDPOINT_VARS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")
CREDENTIAL_VARS = SECRET_VARS[:-1] + ENDPOINT_VARS


class StorageError(UserError):
    """Storage is unreachable, missing or misconfigured."""


def endpoint_from_env() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def read_whole(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file in one read: on S3 one GET of the object's full range. (``open_input_stream``
    reads in small ranged GETs one after another: a 64 MB object took 20 s from a loopback moto
    server, against 0.3 s this way; see benchmarks/RESULTS.md, "Checkpoint I/O".)"""
    with fs.open_input_file(path) as fh:
        return fh.read(fh.size())


@dataclass(frozen=True)
class Storage:
    """A filesystem plus the root path inside it; ``uri`` is what users see."""
    fs: pafs.FileSystem
    root: str            # path inside fs (bucket/prefix for S3, absolute dir locally)
    uri: str             # s3://bucket/prefix or the absolute local path
    endpoint: Optional[str] = None

    @property
    def is_remote(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return posixpath.join(self.uri, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        return read_whole(self.fs, self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> str:
        target = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        with self.fs.open_output_stream(target) as fh:
            fh.write(data)
        return self.uri_of(*parts)

    def listdir(self, *parts: str) -> list[str]:
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def check(self) -> None:
        """Fail fast (seconds) if the location cannot be reached or written."""
        try:
            if self.is_remote:
                bucket = self.root.split("/", 1)[0]
                info = self.fs.get_file_info(bucket)
                if info.type == pafs.FileType.NotFound:
                    raise StorageError(f"storage.path: bucket {bucket!r} does not exist at "
                                       f"{self.endpoint or 'AWS S3'}; create it first")
            else:
                self.fs.create_dir(self.root, recursive=True)
        except StorageError:
            raise
        except OSError as err:
            first = first_line(err)
            raise StorageError(f"storage.path: cannot reach {self.uri} "
                               f"(endpoint {self.endpoint or 'default'}): {first}; check storage.endpoint, "
                               f"network and AWS credentials") from None


def _s3_filesystem(endpoint: Optional[str], region: Optional[str], fail_fast: bool) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                    or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if fail_fast:
        kwargs.update(connect_timeout=2.0, request_timeout=5.0,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    return pafs.S3FileSystem(**kwargs)


def open_storage(path: str, endpoint: Optional[str] = None, region: Optional[str] = None,
                 fail_fast: bool = False) -> Storage:
    """``storage.path`` (+ endpoint) -> :class:`Storage`. ``fail_fast`` uses short timeouts."""
    if path.startswith("s3://"):
        endpoint = endpoint or endpoint_from_env()
        parsed = urlparse(path)
        if not parsed.netloc:
            raise StorageError(f"storage.path: {path!r} has no bucket; write s3://bucket/prefix")
        root = posixpath.join(parsed.netloc, parsed.path.strip("/")).rstrip("/")
        return Storage(_s3_filesystem(endpoint, region, fail_fast), root, f"s3://{root}", endpoint)
    if "://" in path and not path.startswith("file://"):
        raise StorageError(f"storage.path: scheme of {path!r} is not supported; use a local directory or s3://")
    local = Path(path.removeprefix("file://")).expanduser().resolve()
    return Storage(pafs.LocalFileSystem(), str(local), str(local))
