"""Evaluation: masked perplexity and clustering metrics, and the report."""
