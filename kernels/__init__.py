"""Triton kernels, installed as ``fastload.kernels`` (one op per file, each beside a PyTorch
reference in its test). Tested on CPU with ``TRITON_INTERPRET=1``."""
