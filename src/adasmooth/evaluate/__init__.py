"""Evaluation: robustness under attack, alpha sweeps, calibration, analysis and reports."""
