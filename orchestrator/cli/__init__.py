"""The ``denoiselab`` command line (``main``), one module per command group."""
from orchestrator.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
