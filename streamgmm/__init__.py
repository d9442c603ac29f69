"""streamgmm: streaming online-EM Gaussian mixtures for real-time anomaly detection."""

from .mixture import OnlineGaussianMixture

__all__ = ["OnlineGaussianMixture"]
__version__ = "0.1.0"
