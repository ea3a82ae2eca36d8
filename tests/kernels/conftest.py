"""Kernel tests on the CPU: every Triton kernel runs under the Triton interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, i.e. when a ``qa_app.kernels`` module
is first imported, so it is set here, before any test module of this folder imports one. (Importing torch,
or triton itself, earlier is harmless; importing a kernel module earlier is not: see ``_interpreted``.)
Note that the variable stays set for the rest of the pytest process.

This folder is a package (an empty ``__init__.py``) so that this file is imported as ``kernels.conftest``: the
modules in tests/ do ``from conftest import ASSETS``, which a second top-level ``conftest`` would shadow.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """The Triton 3.6 interpreter converts 1-element arrays to ints the way NumPy deprecated: not ours."""
    quiet = pytest.mark.filterwarnings(
        "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(quiet)


@pytest.fixture(autouse=True, scope="session")
def _interpreted():
    """Fail loudly, not cryptically, if a kernel module was imported before this file set the variable
    (e.g. ``pytest tests/test_speech_encoder.py tests/kernels``: that test module imports the kernels first)."""
    from triton.runtime.interpreter import InterpretedFunction

    from qa_app.kernels import attention

    if not isinstance(attention._attention_kernel, InterpretedFunction):
        pytest.fail("qa_app.kernels was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
                    "run tests/kernels on its own or first", pytrace=False)


def check_close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Same shape and dtype, and every element within ``tol`` absolute, scaled by the reference's magnitude
    (fp32 on both sides: differences are summation order only)."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert torch.isfinite(got).all(), "non-finite values in the kernel's output"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, atol=tol * scale, rtol=0)


@pytest.fixture
def close():
    return check_close


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
