"""End-to-end tests on the real Linen models of ``tests/models.py``.

Every model is checked against plain ``module.init`` / ``module.apply`` on the
same keys:

* ``abstract_init`` gives the tree of ``jax.eval_shape(module.init)``
  (structure, boxes, shapes, dtypes), from specs, compiling nothing;
* ``materialize`` gives exactly the tree of ``jax.jit(module.init)``, bit for
  bit, from specs. Against ``module.init`` run eagerly it is equal up to float
  rounding only: once an initializer such as ``normal(0.02)`` is compiled, XLA
  may fold its constants (``sqrt(2) * erfinv(u) * 0.02``) and move the last bit;
* ``lazy(module)`` is a drop-in for ``module.init`` / ``module.apply``;
* an ``initializers=`` override replaces exactly the matched parameters and
  leaves every other leaf as ``module.init`` made it; on ``nn.scan`` /
  ``nn.vmap`` stacks it initializes each layer as a parameter of its own.

The models are small, so the whole file runs in about a minute on 2 CPU cores;
nearly all of it is XLA compiling random initializers.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest

import flaxlazy
from flaxlazy._src.compiles import count_compiles

CASES = models.all_cases()
_BY_NAME = {case.name: case for case in CASES}
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])

_PREFIX = {
    jnp.dtype(jnp.float16): "f16",
    jnp.dtype(jnp.float32): "f32",
    jnp.dtype(jnp.float64): "f64",
    jnp.dtype(jnp.bfloat16): "bf16",
    jnp.dtype(jnp.int8): "i8",
    jnp.dtype(jnp.int16): "i16",
    jnp.dtype(jnp.int32): "i32",
    jnp.dtype(jnp.int64): "i64",
    jnp.dtype(jnp.uint8): "u8",
    jnp.dtype(jnp.uint32): "u32",
    jnp.dtype(jnp.bool_): "bool",
}


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def to_specs(tree):
    """Arrays -> ``jax.ShapeDtypeStruct``; Python values (flags, None) are kept."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_array(x) else x, tree
    )


def to_string_specs(tree):
    """Arrays -> ``flaxlazy.spec("f32[2,5]")``; keys (no string form) -> ``ShapeDtypeStruct``."""

    def convert(x):
        if not _is_array(x):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return flaxlazy.spec(f"{_PREFIX[jnp.dtype(x.dtype)]}[{','.join(map(str, x.shape))}]")

    return jax.tree.map(convert, tree)


def partition(tree):
    """``(arrays, rebuild)``: the array leaves of ``tree`` and ``rebuild(arrays) -> tree``.

    Python values (flags, ints, ``None``) stay closed over in ``rebuild``, so a
    function of ``arrays`` can be jitted or ``eval_shape``d as is.
    """
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def rebuild(arrays):
        full = list(leaves)
        for i, a in zip(where, arrays, strict=True):
            full[i] = a
        return jax.tree.unflatten(treedef, full)

    return [leaves[i] for i in where], rebuild


def rngs_for(case, seed: int = 0):
    return models.make_rngs(case.rngs, seed)


def init_call(case):
    """``(fn, arrays)`` with ``fn(rngs, arrays)`` = ``module.init(rngs, *args, **kwargs)``."""
    arrays, rebuild = partition((case.args, case.kwargs))

    def fn(rngs, arrays):
        args, kwargs = rebuild(arrays)
        return case.module.init(rngs, *args, method=case.method, **kwargs)

    return fn, arrays


@functools.cache
def reference(name: str):
    """``jax.jit(module.init)`` on the case's concrete inputs; computed once per case."""
    case = _BY_NAME[name]
    fn, arrays = init_call(case)
    return jax.jit(fn)(rngs_for(case), arrays)


def materialize_inputs(case):
    """Specs, except where init depends on input values (then the concrete inputs)."""
    if case.data_dependent:
        return case.args, case.kwargs
    return to_specs(case.args), to_specs(case.kwargs)


def assert_same_tree(got, want):
    """Same structure (dict types, collection names, box types and metadata), bit-equal leaves."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for leaf in jax.tree.leaves(got):
        assert isinstance(leaf, jax.Array), type(leaf)
    chex.assert_trees_all_equal(got, want, strict=True)


def param_names(variables) -> set[str]:
    """Last path segment of every leaf in the 'params' collection."""
    flat = jax.tree_util.tree_flatten_with_path(variables.get("params", {}), is_leaf=_is_box)[0]
    return {path[-1].key for path, _ in flat}


def map_params(fn, variables):
    """``variables`` with each params leaf ``x`` at path ``p`` ("a/b/kernel") set to ``fn(p, x)``.

    Boxes (``nn.Partitioned`` ...) are kept: ``fn`` sees and returns the array inside.
    """

    def replace(path, leaf):
        if path[0].key != "params":
            return leaf
        name = "/".join(str(k.key) for k in path[1:])
        if _is_box(leaf):
            return leaf.replace_boxed(fn(name, leaf.unbox()))
        return fn(name, leaf)

    return jax.tree_util.tree_map_with_path(replace, variables, is_leaf=_is_box)


# --------------------------------------------------------------------------
# (a) abstract_init


@parametrize_cases
@pytest.mark.parametrize("spec_form", ["ShapeDtypeStruct", "string"])
def test_abstract_init_matches_eval_shape(case, spec_form):
    make_specs = to_specs if spec_form == "ShapeDtypeStruct" else to_string_specs
    rngs = rngs_for(case)
    fn, arrays = init_call(case)
    want = jax.eval_shape(fn, rngs, arrays)
    args, kwargs = make_specs(case.args), make_specs(case.kwargs)
    with count_compiles() as compiles:
        got = flaxlazy.abstract_init(case.module, rngs, *args, method=case.method, **kwargs)
    assert compiles.count == 0, "abstract_init must not compile (or run) anything"
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(g, jax.ShapeDtypeStruct), type(g)
        assert (g.shape, g.dtype) == (w.shape, w.dtype)


# --------------------------------------------------------------------------
# (b) materialize


@parametrize_cases
def test_materialize_matches_init(case):
    args, kwargs = materialize_inputs(case)
    got = flaxlazy.materialize(case.module, rngs_for(case), *args, method=case.method, **kwargs)
    assert_same_tree(got, reference(case.name))


def test_materialize_data_dependent_init_from_specs_raises():
    """Values that depend on inputs given only as specs are an error, not zeros."""
    case = _BY_NAME["data_dependent"]
    with pytest.raises(ValueError, match="depend"):
        flaxlazy.materialize(case.module, rngs_for(case), *to_specs(case.args))


@parametrize_cases
def test_repeated_materialize_does_not_recompile(case):
    args, kwargs = materialize_inputs(case)
    rngs = rngs_for(case, seed=5)
    jax.block_until_ready(
        flaxlazy.materialize(case.module, rngs, *args, method=case.method, **kwargs)
    )
    with count_compiles() as compiles:
        jax.block_until_ready(
            flaxlazy.materialize(case.module, rngs, *args, method=case.method, **kwargs)
        )
    assert compiles.count == 0


@pytest.mark.parametrize(
    "module, exact",
    [
        (nn.Dense(4), True),
        (nn.Dense(4, kernel_init=nn.initializers.normal(0.02)), False),
    ],
    ids=["lecun_normal", "normal"],
)
def test_materialize_matches_eager_init(module, exact):
    """Against plain, uncompiled ``module.init``.

    Bit-equal for Flax's default initializers; ``normal(0.02)`` compiles to
    ``(sqrt(2) * 0.02) * erfinv(u)``, 1 ulp away from the eager result for some
    elements, so there only float rounding is allowed.
    """
    key, x = jax.random.key(7), jnp.ones((2, 8))
    want = module.init(key, x)
    got = flaxlazy.materialize(module, key, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    if exact:
        chex.assert_trees_all_equal(got, want, strict=True)
    else:
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("raw", [False, True], ids=["typed_key", "raw_key"])
def test_materialize_accepts_a_bare_key(raw):
    """``rngs=key`` is ``rngs={"params": key}``, for typed and raw uint32 keys alike."""
    case = _BY_NAME["mlp_compact"]
    key = rngs_for(case)["params"]
    if raw:
        key = jax.random.key_data(key)
    got = flaxlazy.materialize(case.module, key, *to_specs(case.args))
    assert_same_tree(got, reference(case.name))


# --------------------------------------------------------------------------
# (c) lazy


@parametrize_cases
def test_lazy_is_a_drop_in_for_init_and_apply(case):
    lz = flaxlazy.lazy(case.module)
    assert isinstance(lz, flaxlazy.Lazy)
    want = reference(case.name)

    shapes = lz.shapes(
        rngs_for(case), *to_specs(case.args), method=case.method, **to_specs(case.kwargs)
    )
    assert jax.tree.structure(shapes) == jax.tree.structure(want)
    for s, w in zip(jax.tree.leaves(shapes), jax.tree.leaves(want), strict=True):
        assert (s.shape, s.dtype) == (w.shape, w.dtype)

    variables = lz.init(rngs_for(case), *case.args, method=case.method, **case.kwargs)
    assert_same_tree(variables, want)

    # Both applies in one compiled function: eager apply dispatches op by op and is slow.
    args = case.args if case.apply_args is None else case.apply_args
    arrays, rebuild = partition((args, case.kwargs))

    def both(variables, reference_variables, arrays, rngs):
        args, kwargs = rebuild(arrays)
        options = dict(kwargs, method=case.method, mutable=case.mutable, rngs=rngs)
        return (
            lz.apply(variables, *args, **options),
            case.module.apply(reference_variables, *args, **options),
        )

    rngs = models.make_rngs(case.apply_rngs, seed=1)
    got, expected = jax.jit(both)(variables, want, arrays, rngs)
    chex.assert_trees_all_equal(got, expected)


def test_lazy_init_inside_jit():
    case = _BY_NAME["mlp_compact"]
    lz = flaxlazy.lazy(case.module)
    got = jax.jit(lz.init)(rngs_for(case), *case.args)
    assert_same_tree(got, reference(case.name))


# --------------------------------------------------------------------------
# (d) initializers=


@parametrize_cases
def test_initializer_override_changes_only_matched_params(case):
    want = reference(case.name)
    names = param_names(want)
    assert "kernel" in names, "every model in the zoo has kernels"
    rules = [("**/kernel", nn.initializers.zeros)]
    fills = {"kernel": jnp.zeros_like}
    if "bias" in names:
        rules.append(("**/bias", nn.initializers.ones))
        fills["bias"] = jnp.ones_like
    args, kwargs = materialize_inputs(case)
    got = flaxlazy.materialize(
        case.module, rngs_for(case), *args, initializers=rules, method=case.method, **kwargs
    )

    def expected(path, x):
        fill = fills.get(path.rsplit("/", 1)[-1])
        return x if fill is None else fill(x)

    assert_same_tree(got, map_params(expected, want))


def test_nested_tree_and_array_overrides_on_transformer():
    """A pretrained embedding (array), a zeroed subtree and a ``None`` (keep) in a nested dict.

    The embedding is also the tied output head (``Embed.attend``).
    """
    case = _BY_NAME["transformer"]
    pretrained = np.linspace(-1.0, 1.0, 32 * 8, dtype=np.float32).reshape(32, 8)
    tree = {
        "embed": {"embedding": pretrained},
        "MultiHeadDotProductAttention_0": {"query": nn.initializers.zeros, "out": {"bias": None}},
    }
    lz = flaxlazy.lazy(case.module, initializers=tree)
    got = lz.init(rngs_for(case), *to_specs(case.args), **to_specs(case.kwargs))

    def expected(path, x):
        if path == "embed/embedding":
            return jnp.asarray(pretrained)
        if path.startswith("MultiHeadDotProductAttention_0/query/"):
            return jnp.zeros_like(x)
        return x

    assert_same_tree(got, map_params(expected, reference(case.name)))


# prefix of the stacked params and the size of the stacking axis (always axis 0)
_STACKED = {
    "scan_remat": ("layers", 2),
    "vmap_ensemble": ("members", 3),
}


@pytest.mark.parametrize("case", [_BY_NAME[name] for name in _STACKED], ids=list(_STACKED))
def test_override_on_stacked_params_is_per_layer(case):
    """Each layer's slice is initialized as that layer's own parameter.

    With fan-in uniform init the per-layer bound is sqrt(3 / fan_in); computing
    fan-in over the stacked shape would shrink it by sqrt(num_layers).
    """
    prefix, num_layers = _STACKED[case.name]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
    args, kwargs = materialize_inputs(case)
    got = flaxlazy.materialize(
        case.module,
        rngs_for(case),
        *args,
        initializers={f"{prefix}/**/kernel": init},
        method=case.method,
        **kwargs,
    )
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(got["params"][prefix]))[0]
    kernels = [leaf for path, leaf in flat if path[-1].key == "kernel"]
    assert kernels
    for kernel in kernels:
        assert kernel.shape[0] == num_layers
        fan_in = kernel.shape[-2]
        magnitude = np.abs(np.asarray(kernel))
        assert magnitude.max() <= np.sqrt(3.0 / fan_in)
        assert magnitude.max() > np.sqrt(3.0 / (fan_in * num_layers))
        for i in range(num_layers):
            for j in range(i):
                assert not np.array_equal(kernel[i], kernel[j]), "layers share a key"
