"""Cases where a stale cache would return an earlier call's values (tests/test_soundness.py).

Each case is ``case(stage) -> pytree of arrays``: stage 1 and stage 2 differ in an
initializer's array, closure, rule order, object state or a global. The test runs stage 1
then stage 2 in one process and compares stage 2 with a fresh process that runs stage 2
alone, and with the framework's own init where the module's own initializers are used.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flaxlazy

X = flaxlazy.spec("f32[2,4]")
KEY_SEED = 0
SCALE = 1.0  # a module-level global read by initializers; changed between stages


def key():
    return jax.random.key(KEY_SEED)


def dense_params(initializers, features=3):
    return flaxlazy.materialize(nn.Dense(features), key(), X, initializers=initializers)


def arrays(stage):
    bias = jnp.ones(3) if stage == 1 else jnp.full(3, 7.0)
    return dense_params({"bias": bias})


def arrays_train_state(stage):
    bias = jnp.ones(3) if stage == 1 else jnp.full(3, 7.0)
    state = flaxlazy.init_train_state(
        nn.Dense(3), optax.sgd(0.1), key(), X, initializers={"bias": bias}
    )
    return state.params


def arrays_lazy(stage):
    bias = jnp.ones(3) if stage == 1 else jnp.full(3, 7.0)
    return flaxlazy.lazy(nn.Dense(3), initializers={"bias": bias}).init(key(), X)


def rule_order(stage):
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    rules = {"bias": ones, "*": zeros} if stage == 1 else {"*": zeros, "bias": ones}
    return dense_params(rules)


def rule_order_list(stage):
    rules = [("**/kernel", nn.initializers.ones), ("**", nn.initializers.zeros)]
    return dense_params(rules if stage == 1 else rules[::-1])


def closure_over_array(stage):
    captured = jnp.arange(3.0) if stage == 1 else jnp.arange(3.0) * -5.0
    return dense_params({"bias": lambda k, shape, dtype: captured.astype(dtype)})


def closure_over_large_array(stage):
    # Larger than programs.BAKE_BYTES: passed as a runtime argument, not baked in.
    captured = jnp.linspace(0.0, 1.0, 4 * 3000) * (1.0 if stage == 1 else 3.0)
    model = nn.Dense(3000)
    return flaxlazy.materialize(
        model, key(), X,
        initializers={"kernel": lambda k, shape, dtype: captured.reshape(shape).astype(dtype)},
    )


def _scaled(value, k, shape, dtype):
    del k
    return jnp.broadcast_to(value, shape).astype(dtype)


def partial_over_array(stage):
    value = jnp.asarray(2.0 if stage == 1 else -3.0)
    return dense_params({"bias": functools.partial(_scaled, value)})


def partial_over_float(stage):
    return dense_params({"bias": functools.partial(_scaled, 2.0 if stage == 1 else -3.0)})


@dataclasses.dataclass
class Const:
    value: float

    def __call__(self, k, shape, dtype):
        del k
        return jnp.full(shape, self.value, dtype)


def callable_object(stage):
    return dense_params({"bias": Const(1.0 if stage == 1 else 4.0)})


class Scaler:
    def __init__(self, scale):
        self.scale = scale

    def init(self, k, shape, dtype):
        return self.scale * jax.random.normal(k, shape, dtype)


def bound_method(stage):
    return dense_params({"kernel": Scaler(1.0 if stage == 1 else 9.0).init})


_SHARED = Const(1.0)


def mutated_object(stage):
    _SHARED.value = 1.0 if stage == 1 else 5.0
    return dense_params({"bias": _SHARED})


def _global_init(k, shape, dtype):
    return SCALE * jax.random.normal(k, shape, dtype)


def global_in_initializer(stage):
    global SCALE
    SCALE = 1.0 if stage == 1 else 6.0
    return dense_params({"kernel": _global_init})


def make_bias_init(a):
    return lambda k, shape, dtype=jnp.float32: jnp.broadcast_to(a, shape).astype(dtype)


def module_own_closure(stage):
    a = jnp.asarray([1.0, 2.0, 3.0]) if stage == 1 else jnp.asarray([-4.0, 5.0, 0.5])
    return flaxlazy.materialize(nn.Dense(3, bias_init=make_bias_init(a)), key(), X)


def module_own_global(stage):
    global SCALE
    SCALE = 1.0 if stage == 1 else 6.0
    return flaxlazy.materialize(nn.Dense(3, kernel_init=_global_init), key(), X)


def module_own_scan(stage):
    """The traced fallback (nn.scan), with a module-own closure over an array."""
    a = jnp.full((3,), 1.0 if stage == 1 else 2.5)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(3, bias_init=make_bias_init(a))(x), None

    model = nn.scan(
        Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
    )()
    return flaxlazy.materialize(model, key(), flaxlazy.spec("f32[2,3]"), None)


def nnx_values(model):
    """An NNX module's state as a pure dict of arrays (keys as their raw data)."""
    def plain(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    return jax.tree.map(plain, nnx.to_pure_dict(nnx.state(model)))


class NNXNet(nnx.Module):
    def __init__(self, *, bias_init=nnx.initializers.zeros, kernel_init=None, rngs):
        kernel_init = kernel_init or nnx.initializers.lecun_normal()
        self.linear = nnx.Linear(4, 3, bias_init=bias_init, kernel_init=kernel_init,
                                 rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def nnx_own_closure(stage):
    a = jnp.asarray([1.0, 2.0, 3.0]) if stage == 1 else jnp.asarray([-4.0, 5.0, 0.5])
    return nnx_values(flaxlazy.materialize(NNXNet, bias_init=make_bias_init(a),
                                           rngs=nnx.Rngs(KEY_SEED)))


def nnx_own_global(stage):
    global SCALE
    SCALE = 1.0 if stage == 1 else 6.0
    return nnx_values(flaxlazy.materialize(NNXNet, kernel_init=_global_init,
                                           rngs=nnx.Rngs(KEY_SEED)))


def nnx_arrays(stage):
    bias = jnp.ones(3) if stage == 1 else jnp.full(3, 7.0)
    return nnx_values(flaxlazy.materialize(NNXNet, rngs=nnx.Rngs(KEY_SEED),
                                           initializers={"linear/bias": bias}))


def nnx_vmap_closure(stage):
    """An nnx.vmap stack whose layers' bias initializer closes over an array."""
    a = jnp.full((3,), 1.0 if stage == 1 else 2.5)

    def stack(*, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXNet(bias_init=make_bias_init(a), rngs=rngs)

        return make(rngs)

    return nnx_values(flaxlazy.materialize(stack, rngs=nnx.Rngs(KEY_SEED)))


CASES = {
    f.__name__: f
    for f in (
        arrays, arrays_train_state, arrays_lazy, rule_order, rule_order_list,
        closure_over_array, closure_over_large_array, partial_over_array,
        partial_over_float, callable_object, bound_method, mutated_object,
        global_in_initializer, module_own_closure, module_own_global, module_own_scan,
        nnx_own_closure, nnx_own_global, nnx_arrays, nnx_vmap_closure,
    )
}

# NNX cases using only the module's own initializers: also compared with nnx.jit.
NNX_OWN = {
    "nnx_own_closure": lambda stage: functools.partial(NNXNet, bias_init=make_bias_init(
        jnp.asarray([1.0, 2.0, 3.0]) if stage == 1 else jnp.asarray([-4.0, 5.0, 0.5]))),
    "nnx_own_global": lambda stage: functools.partial(NNXNet, kernel_init=_global_init),
}

# Cases using only the module's own initializers: also compared with jax.jit(init).
OWN = {
    "module_own_closure": lambda stage: nn.Dense(
        3, bias_init=make_bias_init(
            jnp.asarray([1.0, 2.0, 3.0]) if stage == 1 else jnp.asarray([-4.0, 5.0, 0.5])
        )
    ),
    "module_own_global": lambda stage: nn.Dense(3, kernel_init=_global_init),
}


def set_stage_globals(stage):
    global SCALE
    SCALE = 1.0 if stage == 1 else 6.0


if __name__ == "__main__":  # a fresh process: stage 2 of every case, saved to argv[1]
    import sys

    import numpy as np

    out = {}
    for name, case in CASES.items():
        leaves = jax.tree_util.tree_flatten_with_path(case(2))[0]
        for path, leaf in leaves:
            out[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    np.savez(sys.argv[1], **out)
