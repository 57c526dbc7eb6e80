"""The token-bucket format of Dataset Decomposition: tokenized documents split into
power-of-two length buckets (``decompose``), read by ``DecompositionLoader``."""
