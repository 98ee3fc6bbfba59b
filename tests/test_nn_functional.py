"""Tests of selfattn.nn.functional (erf, gelu, linear, dropout) and of the package's import weight."""

import math

import numpy as np

from selfattn import nn
from selfattn.nn import functional as F


def test_erf_and_gelu():
    x = np.linspace(-9, 9, 20001)
    np.testing.assert_allclose(nn.erf(x), [math.erf(v) for v in x], rtol=1e-14, atol=1e-15)
    assert np.isnan(nn.erf(np.array([np.nan]))).all()
    np.testing.assert_allclose(
        nn.gelu(x), x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x])), rtol=1e-13, atol=1e-13
    )


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, selfattn.nn; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'scipy', 'numba', 'cupy')]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gelu_and_erf_dtypes():
    for dt in (np.float16, np.float32, np.float64):
        x = np.linspace(-3, 3, 7).astype(dt)
        assert nn.gelu(x).dtype == dt and nn.erf(x).dtype == dt
    assert nn.gelu(np.arange(-2, 3)).dtype == np.float64  # integers give float64, never truncated values
    np.testing.assert_allclose(nn.gelu(np.arange(-2, 3)), nn.gelu(np.arange(-2.0, 3.0)))
    assert nn.erf(np.zeros((0, 3))).shape == (0, 3)


def test_linear_layout_dtype_and_float16_accumulation():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5)), rng.normal(size=4)
    y = F.linear(x, w, b)
    assert y.shape == (2, 3, 4) and y.dtype == np.float64
    np.testing.assert_allclose(y, np.einsum("bni,oi->bno", x, w) + b, rtol=1e-12)
    assert F.linear(x.astype(np.float32), w.astype(np.float32)).dtype == np.float32
    assert F.linear(x, w, b, dtype=np.float16).dtype == np.float16
    # float16: summed in float32 and rounded once, so a long sum of float16 values is exact to float16 rounding
    n = 4096
    x16, w16 = np.full((1, n), 0.1, np.float16), np.ones((1, n), np.float16)
    exact = n * float(np.float16(0.1))
    assert F.linear(x16, w16)[0, 0] == np.float16(exact)
    assert abs(float(F.linear(x16, w16)[0, 0]) - exact) <= exact * 2**-10


def test_dropout_keeps_dtype_and_scales():
    rng = np.random.default_rng(0)
    x = np.ones((200, 200), np.float16)
    y = F.dropout(x, 0.25, rng)
    assert y.dtype == np.float16 and y.shape == x.shape
    kept = y != 0
    np.testing.assert_array_equal(y[kept], np.float16(1 / 0.75))
    assert 0.72 < kept.mean() < 0.78
    assert F.dropout(x, 0.0, rng) is x
    np.testing.assert_array_equal(x, 1)  # the input is never modified
