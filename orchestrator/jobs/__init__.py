"""One-off Ray jobs: task-affinity clustering (more, e.g. MEME experts, plug in here)."""
