"""bias_act: the fused ``gelu?(x + bias) + residual`` epilogue, against ``bias_act_reference``."""
import pytest
import torch

from qa_app.kernels.bias_act import bias_act, bias_act_reference


@pytest.mark.parametrize("with_bias,gelu,with_residual",
                         [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_matches_reference(close, with_bias, gelu, with_residual):
    """Each step alone and all together; 37x40 = 1480 elements: two 1024-element programs, the second
    partial, and the bias indexed by column (offset % N) across row boundaries."""
    x, b, r = torch.randn(37, 40), torch.randn(40), torch.randn(37, 40)
    b, r = (b if with_bias else None), (r if with_residual else None)
    got = bias_act(x, b, gelu, r)
    ref = bias_act_reference(x, b, gelu, r)
    assert not torch.allclose(ref, x, atol=1e-3)  # the case does change its input
    close(got, ref)


def test_in_place(close):
    """``out=x`` (how linear's cuBLAS candidate uses it) overwrites x with the result."""
    x, b, r = torch.randn(37, 40), torch.randn(40), torch.randn(37, 40)
    ref = bias_act_reference(x, b, True, r)
    got = bias_act(x, b, True, r, out=x)
    assert got.data_ptr() == x.data_ptr()
    close(x, ref)
