"""fastinfluence: fast, low-memory influence estimation and influence-guided unlearning."""
from . import ops
from .config import ProjectionConfig
from .exact import exact_scores
from .extract import GradientExtractor
from .features import Features

__version__ = "0.1.0"

__all__ = ["Features", "GradientExtractor", "ProjectionConfig", "exact_scores", "ops", "__version__"]
