"""Loaders: ReinforcedLoader (images) and DecompositionLoader (tokens)."""
