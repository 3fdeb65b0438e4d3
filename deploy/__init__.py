"""Running splitspace: the local multi-process runner, the CLI, Hugging Face Spaces bundles."""
