"""ml_collections config files, one per task: `--config configs/<task>.py[:ARGS]`."""
