"""ops._checks.all_finite, the one NaN/Inf check (an aminmax pass), against torch.isfinite(t).all()."""
import pytest
import torch

from pyprune.ops._checks import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_matches_isfinite(rng, dtype):
    for trial in range(40):
        rows, cols = int(torch.randint(1, 70, (1,), generator=rng)), int(torch.randint(1, 70, (1,), generator=rng))
        t = (torch.randn(rows, cols, generator=rng, dtype=torch.float64) * 100).to(dtype)
        if trial % 4:  # one to three bad values at random places (NaN, +Inf, -Inf), else none
            for _ in range(int(torch.randint(1, 4, (1,), generator=rng))):
                i, j = int(torch.randint(rows, (1,), generator=rng)), int(torch.randint(cols, (1,), generator=rng))
                t[i, j] = (float("nan"), float("inf"), -float("inf"))[int(torch.randint(3, (1,), generator=rng))]
        for view in (t, t.T, t[:, ::2], t[::3]):
            assert all_finite(view) == bool(torch.isfinite(view).all()), (trial, tuple(view.shape))


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 5))
    assert all_finite(torch.arange(6).reshape(2, 3))  # not floating: no values to check
    assert all_finite(torch.tensor(3.0))
    assert not all_finite(torch.tensor(float("nan")))
    big = torch.full((3,), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert all_finite(big)  # the largest finite value is finite
    assert not all_finite(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    if hasattr(torch, "float8_e4m3fn"):  # formats outside FLOATS take torch.isfinite
        f8 = torch.tensor([0.5, -2.0, 448.0, 0.0]).to(torch.float8_e4m3fn)
        assert all_finite(f8)
        f8[1] = float("nan")
        assert not all_finite(f8)
