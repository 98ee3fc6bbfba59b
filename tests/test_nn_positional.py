"""Tests of selfattn.nn.positional: sinusoidal tables, rotary embeddings and ALiBi slopes."""

import math

import numpy as np
import pytest

from selfattn import nn

# ----------------------------------------------------------------------------- positional encodings


def test_sinusoidal_positions():
    p = nn.sinusoidal_positions(50, 16)
    assert p.shape == (50, 16) and p.dtype == np.float32
    np.testing.assert_allclose(p[7, 4], math.sin(7 / 10000 ** (4 / 16)), rtol=1e-6)
    np.testing.assert_allclose(p[7, 5], math.cos(7 / 10000 ** (4 / 16)), rtol=1e-6)
    assert nn.sinusoidal_positions(0, 4).shape == (0, 4)
    assert nn.sinusoidal_positions(3, 5, dtype=np.float64).shape == (3, 5)
    with pytest.raises(ValueError, match="length"):
        nn.sinusoidal_positions(-1, 4)
    with pytest.raises(TypeError, match="dim"):
        nn.sinusoidal_positions(3, 4.5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_relative_and_norm(interleaved):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(1, 8)), rng.normal(size=(1, 8))

    def dot(m, n):
        return float(
            nn.apply_rotary(q, np.array([m]), interleaved=interleaved)[0]
            @ nn.apply_rotary(k, np.array([n]), interleaved=interleaved)[0]
        )

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-10)
    assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-3)
    x = rng.normal(size=(2, 3, 10, 8)).astype(np.float32)
    r = nn.apply_rotary(x, np.arange(10), interleaved=interleaved)
    assert r.dtype == np.float32 and r.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(nn.apply_rotary(x, np.zeros(10), interleaved=interleaved), x)


def test_rotary_layouts_are_permutations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6))
    perm = np.concatenate([np.arange(0, 6, 2), np.arange(1, 6, 2)])  # interleaved -> half-split order
    inter = nn.apply_rotary(x, np.arange(4), interleaved=True)
    half = nn.apply_rotary(x[:, perm], np.arange(4), interleaved=False)
    np.testing.assert_allclose(inter[:, perm], half, rtol=1e-12)
    # explicit check of the half-split formula at one position
    theta = 3 * 10000.0 ** (-np.arange(0, 6, 2) / 6)
    x1, x2 = x[3, :3], x[3, 3:]
    np.testing.assert_allclose(
        nn.apply_rotary(x, np.arange(4))[3],
        np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta)]),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="even"):
        nn.apply_rotary(np.zeros((2, 5)), np.arange(2))
    with pytest.raises(ValueError, match="positions"):
        nn.apply_rotary(np.zeros((2, 4)), np.arange(3))
    with pytest.raises(TypeError, match="x"):
        nn.apply_rotary(np.zeros((2, 4), np.int32), np.arange(2))


# ----------------------------------------------------------------------------- ALiBi slopes


def test_alibi_slopes_literal_values():
    """2**(-8 i / n) for a power of two n; otherwise the reference algorithm's interleaved extra slopes."""
    np.testing.assert_array_equal(nn.alibi_slopes(8), [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256])
    np.testing.assert_array_equal(nn.alibi_slopes(1), [1 / 256])
    np.testing.assert_array_equal(nn.alibi_slopes(2), [1 / 16, 1 / 256])
    np.testing.assert_array_equal(nn.alibi_slopes(4), [1 / 4, 1 / 16, 1 / 64, 1 / 256])
    # 12 heads: the 8 slopes of 8 heads, then slopes 1, 3, 5, 7 of 16 heads (2**-0.5, 2**-1.5, ...)
    np.testing.assert_allclose(
        nn.alibi_slopes(12),
        [
            0.5,
            0.25,
            0.125,
            0.0625,
            0.03125,
            0.015625,
            0.0078125,
            0.00390625,
            0.7071067811865476,
            0.3535533905932738,
            0.1767766952966369,
            0.08838834764831845,
        ],
        rtol=1e-15,
    )
    # 6 heads: 4 heads' slopes, then slopes 1 and 3 of 8 heads
    np.testing.assert_array_equal(nn.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    np.testing.assert_allclose(nn.alibi_slopes(16)[:3], [2**-0.5, 0.5, 2**-1.5], rtol=1e-15)


def _reference_get_slopes(n):
    """The ALiBi repository's get_slopes (ofirpress/attention_with_linear_biases), verbatim in substance."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _reference_get_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [1, 3, 5, 12, 20, 24, 40, 64, 96])
def test_alibi_slopes_follow_the_reference_algorithm(heads):
    s = nn.alibi_slopes(heads)
    assert s.shape == (heads,) and s.dtype == np.float64
    np.testing.assert_allclose(s, _reference_get_slopes(heads), rtol=1e-13)
    assert len(set(s.tolist())) == heads and (s > 0).all() and (s < 1).all()
    s32 = nn.alibi_slopes(heads, dtype=np.float32)
    assert s32.dtype == np.float32
    np.testing.assert_array_equal(s32, s.astype(np.float32))


def test_alibi_slopes_errors():
    with pytest.raises(ValueError, match="num_heads"):
        nn.alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads"):
        nn.alibi_slopes(4.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.alibi_slopes(4, dtype=np.float16)
