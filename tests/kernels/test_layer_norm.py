"""layer_norm: fused residual add + LayerNorm (+ GELU), against ``layer_norm_reference``."""
import pytest
import torch

from qa_app.kernels.layer_norm import layer_norm, layer_norm_reference


@pytest.mark.parametrize("with_residual,gelu", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("m,n", [(37, 24), (5, 300)])
def test_matches_reference(close, m, n, with_residual, gelu):
    """Rows ragged against the row block (37 rows in blocks of 16; 5 in blocks of 8) and a width that is not
    a power of two (24 -> 32 lanes, 300 -> 512: the mean and variance must ignore the masked lanes).
    Inputs have a large mean so a variance computed over padding lanes would show."""
    x = torch.randn(m, n) * 3 + 5
    r = torch.randn(m, n) if with_residual else None
    w, b = torch.rand(n) + 0.5, torch.randn(n)
    close(layer_norm(x, w, b, 1e-5, residual=r, gelu=gelu), layer_norm_reference(x, w, b, 1e-5, r, gelu))


def test_residual_and_gelu_are_applied(close):
    """Guards the case above: residual and GELU do change the result."""
    x, r = torch.randn(37, 24), torch.randn(37, 24)
    w, b = torch.rand(24) + 0.5, torch.randn(24)
    plain = layer_norm(x, w, b, 1e-5)
    close(plain, layer_norm_reference(x, w, b, 1e-5))
    assert not torch.allclose(plain, layer_norm(x, w, b, 1e-5, residual=r), atol=1e-3)
    assert not torch.allclose(plain, layer_norm(x, w, b, 1e-5, gelu=True), atol=1e-3)
