"""The training engine and its tasks."""
