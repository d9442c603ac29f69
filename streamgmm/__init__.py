"""streamgmm: streaming online-EM Gaussian mixtures for real-time anomaly detection."""

__version__ = "0.1.0"
