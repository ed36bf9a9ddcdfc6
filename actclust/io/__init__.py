"""Data in and out: corpora, models, and one store module per on-disk artifact."""
