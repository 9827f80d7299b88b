"""fastinfluence: fast, low-memory influence estimation and influence-guided unlearning.

    extractor = fastinfluence.GradientExtractor(model, fastinfluence.ProjectionConfig(rank_in=64, rank_out=64))
    train = extractor.extract(train_loader, store="runs/train")   # resumable FeatureStore on disk
    result = fastinfluence.score(extractor.extract(query_loader), train, metric="cosine", topk=10)
"""
import importlib

from . import ops
from .config import ProjectionConfig
from .exact import exact_scores
from .extract import GradientExtractor
from .features import Features
from .kfac import KFACFactors, fit_kfac, kfac_scores
from .scoring import ScoreResult, score, self_influence, token_scores
from .store import FeatureStore

__version__ = "0.1.0"

# Modules that pull in transformers.Trainer and friends load on first use.
_LAZY = {
    "weights": ("fastinfluence.weights", None),
    "losses": ("fastinfluence.losses", None),
    "evaluate": ("fastinfluence.evaluate", None),
    "unlearn": ("fastinfluence.unlearn", None),
    "UnlearnTrainer": ("fastinfluence.unlearn", "UnlearnTrainer"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'fastinfluence' has no attribute {name!r}")


__all__ = [
    "FeatureStore",
    "Features",
    "GradientExtractor",
    "KFACFactors",
    "ProjectionConfig",
    "ScoreResult",
    "UnlearnTrainer",
    "evaluate",
    "exact_scores",
    "fit_kfac",
    "kfac_scores",
    "losses",
    "ops",
    "score",
    "self_influence",
    "token_scores",
    "unlearn",
    "weights",
    "__version__",
]
