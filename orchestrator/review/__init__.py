"""`denoiselab review`: run tables and comparison plots from any MLflow store."""
