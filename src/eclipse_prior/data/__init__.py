"""Embedding stores, data sources and the ``embed`` job that turns image-text pairs into a store.

``eclipse_prior.data.embed`` (which imports torch and transformers) is not imported here, so reading a store stays
light.
"""

from eclipse_prior.data.store import EmbeddingStore, StoreWriter, store_settings, write_store

__all__ = ["EmbeddingStore", "StoreWriter", "store_settings", "write_store"]
