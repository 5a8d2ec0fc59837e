"""Calibration data: where the texts come from (sources.py) and how they become fixed token rows (rows.py)."""
