"""Shared test setup: ``tests/`` on ``sys.path`` (for ``helpers``) and a small CPU thread count."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _few_threads(request):
    """Tiny models run fastest on one thread (no OpenMP spinning on a busy 2-core box) (unit and method tests only)."""
    if Path(str(request.node.fspath)).parent.name not in ("unit", "methods"):
        yield
        return
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
