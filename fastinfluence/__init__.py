"""fastinfluence: fast, low-memory influence estimation and influence-guided unlearning.

extractor = fastinfluence.GradientExtractor(model, fastinfluence.ProjectionConfig(rank_in=64, rank_out=64))
train = extractor.extract(train_loader, store="runs/train")   # resumable FeatureStore on disk
result = fastinfluence.score(extractor.extract(query_loader), train, metric="cosine", topk=10)
"""

import importlib

__version__ = "0.1.0"

# Every public name loads on first use, so that `fastinfluence --help` does not import
# torch and transformers.
_LAZY = {
    "ops": ("fastinfluence.ops", None),
    "data": ("fastinfluence.data", None),
    "batching": ("fastinfluence.batching", None),
    "ProjectionConfig": ("fastinfluence.config", "ProjectionConfig"),
    "exact_scores": ("fastinfluence.exact", "exact_scores"),
    "GradientExtractor": ("fastinfluence.extract", "GradientExtractor"),
    "Features": ("fastinfluence.features", "Features"),
    "ScoreResult": ("fastinfluence.scoring", "ScoreResult"),
    "score": ("fastinfluence.scoring", "score"),
    "ScoreOptions": ("fastinfluence.options", "ScoreOptions"),
    "self_influence": ("fastinfluence.scoring", "self_influence"),
    "token_scores": ("fastinfluence.scoring", "token_scores"),
    "score_batches": ("fastinfluence.storeless", "score_batches"),
    "FeatureStore": ("fastinfluence.store", "FeatureStore"),
    "KFACFactors": ("fastinfluence.kfac", "KFACFactors"),
    "fit_kfac": ("fastinfluence.kfac", "fit_kfac"),
    "kfac_scores": ("fastinfluence.kfac", "kfac_scores"),
    "Normalizer": ("fastinfluence.normalizer", "Normalizer"),
    "precondition": ("fastinfluence.precondition", None),
    "weights": ("fastinfluence.weights", None),
    "losses": ("fastinfluence.losses", None),
    "evaluate": ("fastinfluence.evaluate", None),
    "unlearn": ("fastinfluence.unlearn", None),
    "UnlearnTrainer": ("fastinfluence.unlearn", "UnlearnTrainer"),
    "UnlearnOptions": ("fastinfluence.options", "UnlearnOptions"),
    "InfluenceCallback": ("fastinfluence.callback", "InfluenceCallback"),
    "trajectory": ("fastinfluence.trajectory", None),
    "index": ("fastinfluence.index", None),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastinfluence' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY) + ["__version__"]
