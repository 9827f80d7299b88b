"""fastinfluence: fast, low-memory influence estimation and influence-guided unlearning."""
from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
