"""Experiment harnesses the chapters call, one module per topic (grids, tuning, cached runs)."""
