"""Orchestration: the actor lifecycle, Ray setup, the pipeline and the sweep."""
