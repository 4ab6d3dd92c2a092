"""``python -m orchestrator`` == ``denoiselab``."""
from orchestrator.cli import main

raise SystemExit(main())
