"""Adapters to the outside: storage (local or S3), MLflow tracking, the Ray session, checkpoint lookup, config files and the Parquet dataset format."""
