"""Programs: constants evaluated without compiling, as JAX would evaluate them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlazy._src import programs
from flaxlazy._src.compiles import count_compiles


def _counter(n):
    """A stream counter as ``nnx.vmap`` leaves it: zeros, incremented per parameter."""
    return jax.make_jaxpr(lambda: [jnp.zeros((n,), jnp.uint32) + 1 + 1,
                                   (jnp.full((n,), 2**32 - 1, jnp.uint32) + 2).astype(jnp.int32),
                                   jnp.int32(5) * 3 - 7])()


@pytest.mark.parametrize("n", [3, 48])
def test_integer_constants_equal_jaxs_and_compile_nothing(n):
    closed = _counter(n)
    with jax.ensure_compile_time_eval():
        want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts)
    with count_compiles() as c:
        got = programs.eval_constants(_counter(n + 100))  # a shape never seen
    assert c.count == 0
    got_small = programs.eval_constants(closed)
    chex.assert_trees_all_equal([np.asarray(x) for x in got_small], [np.asarray(x) for x in want])
    assert [x.dtype for x in got_small] == [np.dtype(np.uint32), np.dtype(np.int32),
                                           np.dtype(np.int32)]
    np.testing.assert_array_equal(got[1], np.ones(n + 100, np.int32))  # wrapped around


def test_other_constants_are_evaluated_by_jax():
    closed = jax.make_jaxpr(lambda: [jnp.sqrt(jnp.float32(2.0)) * 3, jnp.arange(4) + 1])()
    got = programs.eval_constants(closed)
    chex.assert_trees_all_equal(np.asarray(got[0]), np.float32(np.sqrt(np.float32(2.0)) * 3))
    np.testing.assert_array_equal(got[1], np.arange(4) + 1)


def test_integer_operations_on_jax_evaluated_values():
    """Integer arithmetic on a value JAX evaluates (a float converted to an integer)
    waits for it, and equals JAX's evaluation of the whole jaxpr."""
    closed = jax.make_jaxpr(lambda: [
        (jnp.sqrt(jnp.float32(7.3)) * 4).astype(jnp.int32) + jnp.zeros((3,), jnp.int32) + 2,
        jnp.float32(1.5) * 2,
    ])()
    with jax.ensure_compile_time_eval():
        want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts)
    got = programs.eval_constants(closed)
    chex.assert_trees_all_equal([np.asarray(x) for x in got], [np.asarray(x) for x in want])
