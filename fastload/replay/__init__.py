"""Replay of stored augmentations into pixels: the C++ kernel and its PyTorch reference."""
