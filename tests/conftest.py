import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    # Triton kernels run in the interpreter on CPU-only machines.
    os.environ.setdefault("TRITON_INTERPRET", "1")
