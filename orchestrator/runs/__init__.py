"""Training runs: the driver (Ray Train), the per-worker loop and its reporter, and ``--local``."""
