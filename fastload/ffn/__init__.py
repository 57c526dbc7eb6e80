"""Sparse ReLU FFN execution and relufication."""
