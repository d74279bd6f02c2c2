"""offload.indexes: KV selection policies (sparse attention indexes) and their exact twins."""

from . import cluster, hnsw, retrieval, sentence, shadowkv, simple  # noqa: F401  (registers the policies)
from .base import KVIndex, Selection, SelectionConfig, make_index, policy_names

__all__ = ["KVIndex", "Selection", "SelectionConfig", "make_index", "policy_names"]
