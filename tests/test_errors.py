"""Bad input is a TypeError/ValueError from flaxlazy that names the argument (issue 8).

Each case goes through the public API and checks that the message names the argument
(backticked) or the offending path, what was expected, and the likely fix; none of them
may surface as an AttributeError or a traceback from inside JAX, Flax or Optax.
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy

X = flaxlazy.spec("f32[4,16]")
KEY = jax.random.key(0)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.Dense(8)(x))


@pytest.fixture
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


# ---------------------------------------------------------------- spec


@pytest.mark.parametrize(
    "args, error, match",
    [
        pytest.param(((2.7, 3),), TypeError,
                     r"`shape` \(2\.7, 3\) has float 2\.7 as dimension 0; dimensions must be "
                     r"ints\. Convert it explicitly, e\.g\. int\(2\.7\)", id="float-dim"),
        pytest.param(((2, 3.0),), TypeError, r"float 3\.0 as dimension 1", id="integral-float"),
        pytest.param(((True, 3),), TypeError, r"`shape` \(True, 3\) has the bool True",
                     id="bool-dim"),
        pytest.param(((np.bool_(True),),), TypeError, r"has the bool", id="numpy-bool-dim"),
        pytest.param(((None, 3),), TypeError, r"`shape` .* NoneType None as dimension 0",
                     id="none-dim"),
        pytest.param((b"f32[2]",), TypeError, r"`shape` is bytes b'f32\[2\]'.*shape\.decode\(\)",
                     id="bytes"),
        pytest.param((np.zeros(3),), TypeError,
                     r"`shape` is an array \(ndarray of shape \(3,\), float64\), not a shape.*"
                     r"jax\.ShapeDtypeStruct\(x\.shape, x\.dtype\)", id="numpy-array"),
        pytest.param((jnp.arange(3),), TypeError,
                     r"`shape` is an array .*tuple\(int\(d\) for d in x\)", id="int-array"),
        pytest.param((jax.ShapeDtypeStruct((2,), jnp.float32),), TypeError,
                     r"`shape` is an array \(ShapeDtypeStruct", id="shape-dtype-struct"),
        pytest.param(({"x": (2, 3)},), TypeError,
                     r"`shape` is a dict; .*one spec per entry", id="dict"),
        pytest.param(({2, 3},), TypeError, r"`shape` must be a tuple of ints .* got set",
                     id="set"),
        pytest.param(((2,), object), TypeError,
                     r"`dtype` <class 'object'> is not a numeric or bool dtype \(it is object\)",
                     id="object-dtype"),
        pytest.param(((2,), "U5"), TypeError, r"`dtype` 'U5' is not a numeric or bool dtype",
                     id="str-dtype"),
        pytest.param(((2,), np.str_), TypeError, r"`dtype` .* \(it is str\)", id="numpy-str"),
        pytest.param(((2,), "float"), TypeError, r"`dtype` 'float'.*Did you mean 'float32'\?",
                     id="ambiguous-name"),
        pytest.param(((2,), "flaot32"), TypeError, r"Did you mean 'float32'\?", id="typo"),
        pytest.param(((2,), 3.0), TypeError, r"`dtype` 3\.0 is not a numeric or bool dtype",
                     id="number-as-dtype"),
        pytest.param(("f32",), ValueError, r"Malformed spec 'f32'.*For a scalar write 'f32\[\]'",
                     id="bare-dtype"),
        pytest.param(("f32[2]", jnp.float32), ValueError, r"carries its own dtype.*`dtype`",
                     id="string-and-dtype"),
    ],
)
def test_spec_errors(args, error, match):
    with pytest.raises(error, match=match):
        flaxlazy.spec(*args)


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize(
    "rules, match",
    [
        pytest.param([("**", ("model",))], r"`partition_rules`: pattern '\*\*' maps to tuple "
                     r"\('model',\); expected a jax\.sharding\.PartitionSpec.*Maybe you meant "
                     r"PartitionSpec\('model',\)\?", id="tuple-value"),
        pytest.param({"**": "model"}, r"`partition_rules`: pattern '\*\*' maps to str 'model'.*"
                     r"Maybe you meant PartitionSpec\('model'\)\?", id="str-value"),
        pytest.param([(3, P())], r"`partition_rules`: a path pattern must be a str glob .* "
                     r"got int 3", id="int-pattern"),
        pytest.param("**", r"`partition_rules` must be a mapping or list of \(pattern, value\) "
                     r"pairs.*got str; for one rule write \[\('\*\*', value\)\]", id="bare-str"),
        pytest.param(["**"], r"`partition_rules` entries must be \(pattern, value\) pairs, got "
                     r"'\*\*'; pair the pattern", id="pattern-without-value"),
        pytest.param({"head": {re.compile("k.*"): P()}},
                     r"`partition_rules`: re\.compile\('k\.\*'\) \(under 'head'\) is not a str.*"
                     r"flat form", id="regex-key-in-nested-form"),
    ],
)
def test_partition_rule_type_errors(rules, match, mesh):
    with pytest.raises(TypeError, match=match):
        flaxlazy.materialize(Net(), KEY, X, mesh=mesh, partition_rules=rules)


def test_bad_glob_names_the_argument():
    with pytest.raises(ValueError, match=r"`initializers`: Invalid pattern 'a\*\*/b'"):
        flaxlazy.materialize(Net(), KEY, X, initializers={"a**/b": nn.initializers.zeros})


@pytest.mark.parametrize(
    "logical, match",
    [
        pytest.param("embed", r"got str 'embed'", id="str"),
        pytest.param(["embed"], r"entry 0 is 'embed', not a pair", id="not-pairs"),
        pytest.param([("embed", "data", "x")], r"entry 0 is .*, not a pair", id="triple"),
        pytest.param([(1, "data")], r"entry 0 \(1, 'data'\) has logical name 1, not a str",
                     id="int-name"),
        pytest.param([("embed", 3)], r"entry 0 \('embed', 3\) maps 'embed' to 3", id="int-axis"),
        pytest.param([("embed", P("data"))], r"maps 'embed' to P\('data',\) \(a PartitionSpec; "
                     r"write the mesh axes themselves: \('data',\)\)", id="spec-as-axis"),
    ],
)
def test_malformed_logical_axis_rules(logical, match, mesh):
    with pytest.raises(TypeError, match=r"`logical_axis_rules` must be a sequence of "
                                        r"\(logical_name, mesh_axes\) pairs.*" + match):
        flaxlazy.materialize(Net(), KEY, X, mesh=mesh, logical_axis_rules=logical)


# ---------------------------------------------------------------- mesh


@pytest.mark.parametrize(
    "bad, match",
    [
        pytest.param("data", r"got str 'data'\. Build one with jax\.make_mesh", id="str"),
        pytest.param(("data", "model"), r"got tuple", id="axis-names"),
        pytest.param(lambda: jax.devices(), r"got list .*a list of devices; wrap it in a Mesh",
                     id="devices"),
        pytest.param(lambda: NamedSharding(Mesh(np.array(jax.devices()[:1]), ("m",)), P()),
                     r"This is a NamedSharding; pass its mesh: `mesh=sharding\.mesh`",
                     id="named-sharding"),
    ],
)
def test_mesh_that_is_not_a_mesh(bad, match):
    bad = bad() if callable(bad) else bad
    expected = r"`mesh` must be a jax\.sharding\.Mesh.*" + match
    with pytest.raises(TypeError, match=expected):
        flaxlazy.materialize(Net(), KEY, X, mesh=bad, partition_rules=[("**", P())])
    with pytest.raises(TypeError, match=expected):
        flaxlazy.shardings(flaxlazy.abstract_init(Net(), KEY, X), bad,
                           partition_rules=[("**", P())])
    with pytest.raises(TypeError, match=r"`mesh` must be"):
        flaxlazy.summary(flaxlazy.abstract_init(Net(), KEY, X), mesh=bad)


def test_abstract_mesh_for_shapes_but_not_for_arrays():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    rules = [("**/kernel", P(None, "model")), ("**", P())]
    shapes = flaxlazy.abstract_init(Net(), KEY, X, mesh=mesh, partition_rules=rules)
    kernel = shapes["params"]["head"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P(None, "model"))
    tree = flaxlazy.shardings(shapes, mesh, partition_rules=rules)
    assert tree["params"]["Dense_0"]["bias"].spec == P()
    assert "on each of 8 devices" in flaxlazy.summary(shapes)
    with pytest.raises(TypeError, match=r"`mesh` must be a jax\.sharding\.Mesh, got "
                                        r"AbstractMesh.*describes shapes only"):
        flaxlazy.materialize(Net(), KEY, X, mesh=mesh, partition_rules=rules)


def test_placement_options_need_a_mesh():
    shapes = flaxlazy.abstract_init(Net(), KEY, X)
    with pytest.raises(TypeError, match=r"summary: `require_rules` need a `mesh=`"):
        flaxlazy.summary(shapes, require_rules=True)
    with pytest.raises(TypeError, match=r"summary: `partition_rules` need a `mesh=`"):
        flaxlazy.summary(shapes, partition_rules=[("**", P())])


def test_require_rules_must_be_bool(mesh):
    with pytest.raises(TypeError, match=r"`require_rules` must be None .*True or False; "
                                        r"got 'yes'"):
        flaxlazy.shardings(flaxlazy.abstract_init(Net(), KEY, X), mesh, require_rules="yes")


# ---------------------------------------------------------------- train states, lazy


@pytest.mark.parametrize(
    "tx, match",
    [
        pytest.param(optax.adam, r"got function adam\. Call it to build the transformation, "
                     r"e\.g\. optax\.adam\(1e-3\)", id="uncalled-factory"),
        pytest.param("adam", r"got str 'adam'\. Build it instead of naming it", id="name"),
        pytest.param(None, r"got NoneType None", id="none"),
        pytest.param(lambda: optax.adam(1e-3).init, r"got function", id="init-fn"),
    ],
)
@pytest.mark.parametrize("fn", [flaxlazy.init_train_state, flaxlazy.abstract_train_state])
def test_tx_must_be_a_gradient_transformation(fn, tx, match):
    tx = tx() if getattr(tx, "__name__", "") == "<lambda>" else tx
    with pytest.raises(TypeError, match=rf"{fn.__name__}: `tx` must be an "
                                        rf"optax\.GradientTransformation .*{match}"):
        fn(Net(), tx, KEY, X)


def test_train_state_placement_argument_errors(mesh):
    tx = optax.adam(1e-3)
    with pytest.raises(TypeError, match=r"init_train_state: pass only one of `device` and `mesh`"):
        flaxlazy.init_train_state(Net(), tx, KEY, X, mesh=mesh, device=jax.devices()[0])
    with pytest.raises(TypeError, match=r"abstract_train_state: `partition_rules` need a `mesh=`"):
        flaxlazy.abstract_train_state(Net(), tx, KEY, X, partition_rules=[("**", P())])
    with pytest.raises(TypeError, match=r"init_train_state: `module` must be a flax\.linen"):
        flaxlazy.init_train_state(Net, tx, KEY, X)
    with pytest.raises(TypeError, match=r"`mesh` must be a jax\.sharding\.Mesh, got Abstract"):
        flaxlazy.init_train_state(Net(), tx, KEY, X, mesh=mesh.abstract_mesh,
                                  partition_rules=[("**", P())])


@pytest.mark.parametrize(
    "module, match",
    [
        pytest.param(nn.Dense, r"got the class Dense\. Create an instance: Dense\(\.\.\.\)",
                     id="class"),
        pytest.param("Dense", r"got str 'Dense'", id="str"),
        pytest.param(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), r"an already constructed NNX module "
                     r"\(Linear\)\. Pass the class and its arguments instead", id="nnx"),
    ],
)
def test_lazy_needs_a_linen_module_or_nnx_constructor(module, match):
    with pytest.raises(TypeError, match=r"lazy: `module` must be a flax\.linen\.Module "
                                        r"instance.*" + match):
        flaxlazy.lazy(module)


# ---------------------------------------------------------------- totals and tables


@pytest.mark.parametrize("fn", [flaxlazy.num_params, flaxlazy.nbytes, flaxlazy.summary])
@pytest.mark.parametrize(
    "tree, match",
    [
        pytest.param(Net(), r"`tree` is a flax\.linen\.Module \(Net\), not a variables tree\. "
                     r"Pass .*flaxlazy\.abstract_init\(module, key, \*inputs\)", id="module"),
        pytest.param(Net, r"`tree` is the class Net", id="class"),
        pytest.param("params", r"`tree` is a str \('params'\)", id="str"),
        pytest.param({"params": {"w": "zeros"}}, r"`tree` has str 'zeros' at 'params/w'; "
                     r"expected arrays, jax\.ShapeDtypeStructs and numbers", id="str-leaf"),
        pytest.param({"m": Net()}, r"`tree` has Net .* at 'm'", id="module-leaf"),
    ],
)
def test_totals_need_a_variables_tree(fn, tree, match):
    with pytest.raises(TypeError, match=rf"{fn.__name__}: {match}"):
        fn(tree)


def test_totals_still_count_numbers_and_empty_trees():
    assert flaxlazy.num_params({}) == 0
    assert flaxlazy.num_params({"a": 3, "b": np.float32(2), "c": jnp.zeros((2, 3))}) == 8
    assert flaxlazy.nbytes({"c": jnp.zeros((2, 3), jnp.bfloat16), "f": np.float32(1)}) == 16


# ---------------------------------------------------------------- optimizer-state rules


class Factored(nn.Module):
    """Adafactor factors the (16, 8) kernel into v_row (16,) and v_col (8,): no mirror."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, use_bias=False)(x)


ADAFACTOR = optax.adafactor(1e-3, min_dim_size_to_factor=4)
PARAM_RULES = [("**/kernel", P("data", "model"))]


@pytest.mark.parametrize(
    "opt_rule, match",
    [
        pytest.param(("opt_state/**", P("tensor")),
                     r"`partition_rules`: pattern 'opt_state/\*\*' gives "
                     r"'opt_state/0/v_row/Dense_0/kernel' \(float32\[8\]\) the spec "
                     r"P\('tensor',\), but the mesh has no axis 'tensor'\. Mesh axis sizes: "
                     r"\{'data': 2, 'model': 4\}", id="unknown-axis"),
        pytest.param((re.compile(r"opt_state/0/v/.*"), P("model")),
                     r"`partition_rules`: pattern re\.compile\('opt_state/0/v/\.\*'\) gives "
                     r"'opt_state/0/v/Dense_0/kernel' \(float32\[1\]\) the spec P\('model',\), "
                     r"but dimension 0 \(size 1\) is not divisible by 4 = 'model' \(4\)",
                     id="indivisible-regex"),
        pytest.param(("opt_state/**", P(None, "model")),
                     r"'opt_state/0/v_row/Dense_0/kernel' \(float32\[8\]\) the spec "
                     r"P\(None, 'model'\), but the spec has 2 entries for an array of 1 "
                     r"dimension", id="too-many-entries"),
        pytest.param(None,
                     r"pattern '\*\*/kernel' gives 'opt_state/0/v_row/Dense_0/kernel' "
                     r"\(float32\[8\]\) the spec P\('data', 'model'\).*matched by the same "
                     r"rules as the parameters, on their 'opt_state/\.\.\.' path; put a rule "
                     r"for them first", id="parameter-rule-on-optimizer-leaf"),
    ],
)
@pytest.mark.parametrize("fn", [flaxlazy.abstract_train_state, flaxlazy.init_train_state])
def test_optimizer_rules_are_checked_like_parameter_rules(fn, opt_rule, match, mesh):
    rules = PARAM_RULES if opt_rule is None else [opt_rule, ("opt_state/**", P())] + PARAM_RULES
    with pytest.raises(ValueError, match=match):
        fn(Factored(), ADAFACTOR, KEY, X, mesh=mesh, partition_rules=rules)


def test_unused_optimizer_rule_is_reported(mesh):
    rules = [("opt_state/**/nope/**", P()), ("opt_state/**", P())] + PARAM_RULES
    with pytest.raises(ValueError, match=r"`partition_rules`: pattern 'opt_state/\*\*/nope/\*\*' "
                                         r"matches no parameter\. Closest real paths: "
                                         r"'opt_state/"):
        flaxlazy.abstract_train_state(Factored(), ADAFACTOR, KEY, X, mesh=mesh,
                                      partition_rules=rules)
    state = flaxlazy.abstract_train_state(Factored(), ADAFACTOR, KEY, X, mesh=mesh,
                                          partition_rules=rules, allow_unused_rules=True)
    assert state.opt_state[0].v_row["Dense_0"]["kernel"].sharding.spec == P()


@pytest.mark.parametrize("factory", [nn.initializers.xavier_uniform, nn.initializers.lecun_normal,
                                     nn.initializers.normal])
def test_initializer_factory_passed_uncalled_suggests_calling_it(factory):
    name = factory.__name__
    with pytest.raises(TypeError, match=rf"maps '.*kernel' to `{name}`, which returns a "
                                        rf"function.*Did you mean `{name}\(\)`\?"):
        flaxlazy.materialize(Net(), KEY, X, initializers={"**/kernel": factory})


def test_initializer_factory_on_a_stacked_leaf_suggests_calling_it():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(4)(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)()(x, None)[0]

    name = nn.initializers.xavier_uniform.__name__  # (an alias of glorot_uniform)
    with pytest.raises(TypeError, match=rf"Did you mean `{name}\(\)`"):
        flaxlazy.materialize(Stack(), KEY, flaxlazy.spec("f32[2,4]"),
                             initializers={"**/kernel": nn.initializers.xavier_uniform})


def test_shardings_takes_rules_by_keyword_and_warns_on_positional_ones():
    # Every other flaxlazy function takes its options by keyword; rules by position still
    # work for now, with a warning saying what to write instead.
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    shapes = flaxlazy.abstract_init(Net(), KEY, X)
    rules = [("**/kernel", P(None, "model")), ("**", P())]
    want = flaxlazy.shardings(shapes, mesh, partition_rules=rules)
    deprecated = r"shardings: rules passed by position are deprecated; pass partition_rules="
    with pytest.warns(DeprecationWarning, match=deprecated):
        got = flaxlazy.shardings(shapes, mesh, rules)
    chex.assert_trees_all_equal(got, want)
    with pytest.raises(TypeError, match=r"shardings: `partition_rules` given both by position"):
        flaxlazy.shardings(shapes, mesh, rules, partition_rules=rules)
    with pytest.raises(TypeError, match=r"got 5 positional arguments\. Pass partition_rules="):
        flaxlazy.shardings(shapes, mesh, rules, None, None)
