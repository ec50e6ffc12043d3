"""Offline probes: features at decision points, forced-exit labelling and probe training (docs/calibration.md, "Probe").

Not built yet: see the issue "Offline probe training and conformal calibration".
"""
