"""Calibration and evaluation data: open sets saved locally, or the user's own text."""
