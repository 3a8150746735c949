"""streamcal: streaming ML calibration for particle-physics detectors."""

__version__ = "0.1.0"
