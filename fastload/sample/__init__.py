"""Augmentation parameters: the stored record (params.py) and their sampling (policy)."""
