"""Retry with exponential backoff inside a time budget, for storage and tracking calls that may
meet an outage (an S3 endpoint restarting, a tracking server redeployed).

Only transient failures are retried: ``OSError`` (pyarrow's S3 errors are ``OSError``s),
connection errors, and whatever the caller passes as ``transient`` - minus what waiting cannot
fix (a missing file, access denied, a missing bucket). A failure that outlives the
budget is raised again for the caller to turn into one clear line.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

__all__ = ["Backoff", "retry_call", "first_line", "transient_failure"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Waits of ``first, 2·first, 4·first, …`` capped at ``cap`` seconds, for ``budget`` seconds."""
    budget: float
    first: float = 1.0
    cap: float = 15.0

    def waits(self):
        wait = self.first
        while True:
            yield wait
            wait = min(self.cap, wait * 2)


_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_CODES = ("ACCESS_DENIED", "NO_SUCH_BUCKET", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "AccessDenied", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND")


def transient_failure(err: BaseException) -> bool:
    """An outage (refused or dropped connection, timeout, 5xx), not a missing file or a refusal
    that waiting will not change."""
    if isinstance(err, _PERMANENT):
        return False
    return not any(code in str(err) for code in _PERMANENT_CODES)


def first_line(err: BaseException, limit: int = 160) -> str:
    """An error as one short line; AWS SDK error codes are reworded so callers further up (Ray
    Train's own upload retry matches on them) do not retry a failure that already used its budget."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.replace("AWS Error", "S3 error")[:limit]


def retry_call(fn: Callable[[], T], backoff: Backoff, what: str,
               transient: tuple[type[BaseException], ...] = (OSError, ConnectionError),
               warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """``fn()``, retried on transient errors until ``backoff.budget`` seconds have passed since
    the first failure. Says once when the trouble starts and once when it is over."""
    started: Optional[float] = None
    attempts = 0
    waits = backoff.waits()
    while True:
        try:
            result = fn()
        except transient as err:
            if not transient_failure(err):
                raise
            attempts += 1
            now = clock()
            if started is None:
                started = now
                warn(f"denoiselab: {what} failed ({first_line(err)}); retrying for up to {backoff.budget:.0f} s")
            if now - started >= backoff.budget:
                raise
            sleep(min(next(waits), max(0.0, started + backoff.budget - now)))
            continue
        if started is not None:
            warn(f"denoiselab: {what} succeeded after {clock() - started:.0f} s and {attempts} failed attempt(s)")
        return result
