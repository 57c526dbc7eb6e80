import os

# Pin MKL's kernel choice before torch is imported (and for every subprocess a test starts):
# torch's CPU bmm goes through MKL, which picks another kernel on AVX-512 hosts whose rounding
# moves affine-grid coordinates across pixel-centre ties, so torch/torchvision themselves give
# different pixels there. Any oracle built on torch must be the same on every CPU; fastload's
# replay is (docs/guide/fidelity.md). AVX2 is what the stored torchvision goldens were made with.
os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    # Triton kernels run in the interpreter on CPU-only machines.
    os.environ.setdefault("TRITON_INTERPRET", "1")
