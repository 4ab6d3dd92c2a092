"""Shared test setup: one CPU thread for the unit and method tests (tests/unit, tests/methods)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (no OpenMP spinning on a busy 2-core box)."""
    if Path(str(request.node.fspath)).parent.name not in ("unit", "methods"):
        yield
        return
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
