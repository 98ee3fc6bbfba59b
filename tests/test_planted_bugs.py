"""Planted bugs: the conformance suite must reject every deliberately wrong backend.

:mod:`selfattn.testing.mutants` builds each mutant from the NumPy backend's
public object (a changed Problem or post-processed results; never its private
helpers), registers it under its own name and runs the conformance suite
in-process against it. The test fails if any mutant survives, and prints which
conformance test kills each one (``pytest -s`` or ``-rA`` shows the table).
"""

from __future__ import annotations

import numpy as np
import pytest

from selfattn.testing import mutants


@pytest.fixture(scope="module")
def kills():
    return mutants.run()


def test_every_planted_bug_is_killed(kills):
    width = max(map(len, kills))
    print("\nmutant -> the conformance test that kills it")
    for name, kill in kills.items():
        verdict = kill.test.split("::")[-1] if kill else "SURVIVED" if name != "control" else "passes"
        print(f"  {name:<{width}}  {verdict}")
    assert set(kills) == set(mutants.MUTANTS) | {"control"}
    assert kills["control"] is None, f"the unmodified wrapper failed: {kills['control']}"
    survivors = [name for name, kill in kills.items() if kill is None and name != "control"]
    assert not survivors, f"the conformance suite lets these planted bugs through: {survivors}"


def test_lse_rounding_is_caught_by_the_lse_check_at_float32(kills):
    """The lse of float16 inputs is float32 and is held to float32's tolerance (issue 19's first bug)."""
    kill = kills["lse-rounded-to-input-dtype"]
    assert kill is not None
    assert "test_lse_and_weights_match_oracle" in kill.test and "float16" in kill.test, kill
    assert kill.message.startswith("AssertionError: lse:"), kill


def test_float64_in_float32_is_caught_at_float64_tolerance(kills):
    kill = kills["float64-computed-in-float32"]
    assert kill is not None and "float64" in kill.test and "float64 tolerance" in kill.message, kill


def test_mutants_change_the_results_they_claim_to():
    """Each mutant's hooks really alter what they say (so a kill is about the bug, not the harness)."""
    import selfattn

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 9, 8)).astype(np.float16) * 30
    k = rng.standard_normal((2, 2, 11, 8)).astype(np.float16)
    v = rng.standard_normal((2, 2, 11, 8)).astype(np.float16)
    backends = mutants.build(names=["lse-rounded-to-input-dtype", "causal-band-off-by-one"])
    with mutants.registered(backends):
        _, good = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend="numpy")
        _, bad = selfattn.scaled_dot_product_attention(
            q, k, v, return_lse=True, backend="mutant-lse-rounded-to-input-dtype"
        )
        assert bad.dtype == np.float32 and np.array_equal(bad, good.astype(np.float16).astype(np.float32))
        assert not np.array_equal(bad, good)
        a = selfattn.scaled_dot_product_attention(q, k, v, causal=True, backend="numpy")
        b = selfattn.scaled_dot_product_attention(q, k, v, causal=True, backend="mutant-causal-band-off-by-one")
        assert not np.array_equal(a, b)
        np.testing.assert_array_equal(a[..., -1, :], b[..., -1, :])  # the last row sees every key either way
    assert "mutant-control" not in {r.name for r in selfattn.list_backends()}  # unregistered afterwards


def test_registered_refuses_a_taken_name():
    control = mutants.build(names=[])["mutant-control"]
    with pytest.raises(ValueError, match="already registered: numpy"), mutants.registered({"numpy": control}):
        pass
