"""The GPU tier: admission, per-client fair scheduling, the model executor."""
