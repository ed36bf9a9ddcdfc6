"""Mask capture: the activation hooks, distributed extraction, and verification."""
