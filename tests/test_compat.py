"""The private-API self-check, and the fallback when it fails on an unknown version."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from plans import plan_of

import flaxlazy
from flaxlazy._src import _compat
from flaxlazy._src.compiles import count_compiles

X = flaxlazy.spec("f32[2,5]")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(7, bias_init=nn.initializers.normal(0.3))(x)
        return nn.Dense(3)(nn.LayerNorm()(x))


def test_self_check_passes_on_supported_versions():
    assert _compat.fast_path() == (True, "")
    assert _compat.chunking_ok()


def test_self_check_compiles_nothing():
    _compat.fast_path.cache_clear()
    try:
        with count_compiles() as c:
            assert _compat.fast_path()[0]
        assert c.count == 0
    finally:
        _compat.fast_path.cache_clear()


def test_fallback_warns_once_and_gives_jit_init_values(monkeypatch):
    monkeypatch.setattr(_compat, "fast_path", lambda: (False, "check_x: AssertionError: y"))
    monkeypatch.setattr(_compat, "_WARNED", [])
    key = jax.random.key(1)
    with pytest.warns(RuntimeWarning, match=r"fails flaxlazy's self-check \(check_x"):
        got = flaxlazy.materialize(Net(), key, X)
    chex.assert_trees_all_equal(got, jax.jit(Net().init)(key, jnp.zeros(X.shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        plan = plan_of(Net(), key, X)
        again = flaxlazy.materialize(Net(), key, X, initializers={"**/bias": nn.initializers.zeros})
    assert set(plan.counts()) == {"traced"}  # no replay without a passing self-check
    chex.assert_trees_all_equal(again["params"]["Dense_0"]["bias"], jnp.zeros(7))
    chex.assert_trees_all_equal(again["params"]["Dense_1"]["kernel"],
                                got["params"]["Dense_1"]["kernel"])


def test_abstract_init_needs_no_self_check(monkeypatch):
    def fail():
        raise AssertionError("abstract_init must not run the self-check")

    monkeypatch.setattr(_compat, "warn_if_fallback", fail)
    shapes = flaxlazy.abstract_init(Net(), jax.random.key(0), X)
    assert shapes["params"]["Dense_1"]["kernel"].shape == (7, 3)


def test_self_checks_register_with_compat_on_import():
    from flaxlazy._src import self_checks

    assert _compat._SELF_CHECKS == {"fast_path": [self_checks.check_key_derivation],
                                    "chunking": [self_checks.check_chunked_draw]}
    _compat.register_self_check("chunking", self_checks.check_chunked_draw)  # once only
    assert len(_compat._SELF_CHECKS["chunking"]) == 1


def test_a_verdict_without_its_checks_is_negative(monkeypatch):
    monkeypatch.setattr(_compat, "_SELF_CHECKS", {"fast_path": [], "chunking": []})
    _compat.fast_path.cache_clear()
    _compat.chunking_ok.cache_clear()
    try:
        assert _compat.fast_path() == (False, _compat._UNREGISTERED)
        assert _compat.chunking_ok() is False
    finally:
        monkeypatch.undo()
        _compat.fast_path.cache_clear()
        _compat.chunking_ok.cache_clear()
    assert _compat.fast_path() == (True, "") and _compat.chunking_ok()


def test_jaxpr_types_and_call_primitive_names_of_this_jax():
    closed = jax.make_jaxpr(lambda x: jax.jit(lambda y: y * 2.0)(x) + 1.0)(1.0)
    assert _compat.is_closed_jaxpr(closed) and _compat.is_jaxpr(closed.jaxpr)
    assert _compat.is_literal(closed.jaxpr.eqns[-1].invars[1])
    for wrapped in (jax.jit(jnp.sin), jax.checkpoint(jnp.sin)):
        names = {eqn.primitive.name for eqn in jax.make_jaxpr(wrapped)(1.0).eqns}
        assert names <= _compat.CALL_PRIMITIVES, names
