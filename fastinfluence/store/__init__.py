"""On-disk feature store: safetensors shards under a JSON manifest.

``format`` (the manifest, metadata checks, atomic checksummed files), ``reader``
(:class:`FeatureStore`, the read-only view) and ``writer`` (:class:`StoreWriter`: resume,
rank planning and shard writing; :func:`write_store`; caches beside a store).
"""

from .format import (
    FORMAT,
    MANIFEST,
    VERSION,
    CorruptShardError,
    MismatchError,
    StoreError,
    atomic_write,
    check_same_origin,
    features_metadata,
    layout_from_json,
    layout_to_json,
    normalize_metadata,
    read_manifest,
    save_tensors,
)
from .reader import FeatureStore
from .writer import Run, StoreWriter, write_cache, write_features, write_store

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "CorruptShardError",
    "FeatureStore",
    "MismatchError",
    "Run",
    "StoreError",
    "StoreWriter",
    "atomic_write",
    "check_same_origin",
    "features_metadata",
    "layout_from_json",
    "layout_to_json",
    "normalize_metadata",
    "read_manifest",
    "save_tensors",
    "write_cache",
    "write_features",
    "write_store",
]
