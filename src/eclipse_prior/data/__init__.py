"""Embedding stores, data sources and the ``embed`` job that turns image-text pairs into a store."""
