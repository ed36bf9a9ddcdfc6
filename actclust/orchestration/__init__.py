"""Orchestration: the whole pipeline and the Tune sweep, on top of the stages."""
