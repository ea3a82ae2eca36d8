"""mean_pool: per-sequence mean over packed rows, L2-normalised, against ``mean_pool_reference``."""
import pytest
import torch

from qa_app.kernels.pooling import mean_pool, mean_pool_reference


def _packed(lens, width):
    lens_t = torch.tensor(lens, dtype=torch.int32)
    starts = torch.cumsum(torch.tensor([0] + lens[:-1]), 0).to(torch.int32)
    return torch.randn(sum(lens), width) + 0.5, starts, lens_t


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("width", [24, 512])
def test_matches_reference(close, width, normalize):
    """Ragged lengths (1, 7, 20, 3): at width 512 a program reads 8 rows per step, so 20 rows take three
    steps, the last partial; at width 24 the columns are masked (32 lanes)."""
    x, starts, lens = _packed([1, 7, 20, 3], width)
    got = mean_pool(x, starts, lens, normalize)
    assert got.dtype == torch.float32
    close(got, mean_pool_reference(x, starts, lens, normalize))
    if normalize:
        close(got.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("normalize", [False, True])
def test_empty_sequence_is_zero(close, normalize):
    """A sequence of length 0 (a padded bucket's extra sequence) pools to exact zeros, not NaN, and does not
    disturb its neighbours."""
    x, starts, lens = _packed([5, 0, 9], 24)
    got = mean_pool(x, starts, lens, normalize)
    assert torch.equal(got[1], torch.zeros(24))
    close(got, mean_pool_reference(x, starts, lens, normalize))
    assert got[0].abs().sum() > 0 and got[2].abs().sum() > 0
