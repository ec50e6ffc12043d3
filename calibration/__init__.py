"""Conformal calibration of a probe's scores into a halting threshold (DESIGN.md, "Calibration").

Not built yet: see the issue "Offline probe training and conformal calibration".
"""
