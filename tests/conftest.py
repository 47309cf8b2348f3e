import os

# Triton kernels run in the interpreter on CPU tensors; must be set before triton kernels are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A generator with a fresh random seed per test, so every run draws new inputs. The seed is printed (pytest
    shows it for failing tests); set PYPRUNE_TEST_SEED to replay one."""
    seed = int(os.environ.get("PYPRUNE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"rng seed: {seed} (replay with PYPRUNE_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes (builds and installs the wheel); `make test` runs it, "
                                       "`-m 'not slow'` leaves it out")
