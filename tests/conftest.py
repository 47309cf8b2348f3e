import os

# Triton kernels run in the interpreter on CPU tensors; must be set before triton kernels are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's own random seed, so inputs differ between runs."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    g.seed_value = seed
    return g
