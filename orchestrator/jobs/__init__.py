"""One-off Ray jobs: sampling, evaluation, task affinity."""
