"""Evaluation: official metrics, dataset loaders and the runner (`nanovl eval`)."""
