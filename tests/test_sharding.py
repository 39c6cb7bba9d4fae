"""Sharding: partition rules, Flax annotations, validation, and sharded materialization.

The end-to-end tests build the plan with per-leaf shardings and execute it on the 8
simulated CPU devices that ``conftest.py`` asks for; they skip when fewer exist.
"""

import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from plans import plan_of

import flaxlazy
from flaxlazy._src import engine
from flaxlazy._src import paths
from flaxlazy._src import programs
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src import summary as summary_lib
from flaxlazy._src.compiles import count_compiles

X = flaxlazy.spec("f32[4,16]")

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
)


def make_mesh(shape, names):
    n = math.prod(shape)
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}")
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def with_parts(init, names):
    return nn.with_partitioning(init, names)


def with_logical(init, names):
    return nn.with_logical_partitioning(init, names)


class Plain(nn.Module):
    """No annotations at all: rules decide everything."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dense(64, name="up")(nn.relu(x))
        return nn.Dense(6, name="head")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(
            64,
            kernel_init=with_logical(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=with_logical(nn.initializers.normal(1.0), ("mlp",)),
        )(x)
        x = nn.Dense(
            16,
            kernel_init=with_logical(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=with_logical(nn.initializers.zeros_init(), ("embed",)),
        )(nn.relu(h))
        return x, None


class Annotated(nn.Module):
    """Flax annotations everywhere: mesh axes, logical axes, a scan stack, a scalar."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            32,
            kernel_init=with_parts(nn.initializers.lecun_normal(), (None, "model")),
            bias_init=with_parts(nn.initializers.normal(1.0), ("model",)),
            name="proj",
        )(x)
        x = nn.Dense(
            16,
            kernel_init=with_logical(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=with_logical(nn.initializers.normal(1.0), ("embed",)),
            name="down",
        )(x)
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(name="layers")(x, None)
        temperature = self.param("temperature", nn.initializers.ones, ())
        return x * temperature


def logical_rules(mesh):
    """Logical rules that fit the mesh: split 'embed' over 'data' when there is one."""
    embed = "data" if "data" in mesh.axis_names else None
    return [("layers", None), ("embed", embed), ("mlp", "model")]


def plain_rules(mesh):
    kernel = P("data", "model") if "data" in mesh.axis_names else P(None, "model")
    return [
        ("head/**", P()),
        ("Dense_0/kernel", kernel),
        ("**/kernel", P(None, "model")),
        ("**/bias", P("model")),
        ("batch_stats/**", P("model")),
        ("**", P()),
    ]


def shapes_of(model, spec=X):
    return flaxlazy.abstract_init(model, jax.random.key(0), spec)


def materialize_sharded(model, key, spec, shardings_by_path):
    """The plan/engine path with one requested sharding per collection-qualified path."""
    plan = plan_of(model, key, spec, shardings=lambda path, leaf: shardings_by_path[path])
    return plan, engine.execute(plan, key, [spec])


def named(specs, mesh):
    return {path: NamedSharding(mesh, spec) for path, spec in specs.items()}


def flat_arrays(tree):
    return {p: sharding_lib._array(leaf) for p, leaf in paths.flatten(tree)[0]}


# --------------------------------------------------------------------------
# Choosing specs: rules, annotations, precedence.


def test_rule_paths_params_relative_other_collections_qualified():
    mesh = make_mesh((1,), ("model",))
    specs = sharding_lib.partition_specs(
        shapes_of(Plain()), mesh,
        partition_rules=[
            ("**/mean", P("model")),  # batch_stats/BatchNorm_0/mean: '**' spans the collection
            ("batch_stats/**", P()),
            ("BatchNorm_0/*", P("model")),  # params: matched inside 'params'
            ("**", P()),
        ],
    )
    assert specs["batch_stats/BatchNorm_0/mean"] == P("model")
    assert specs["batch_stats/BatchNorm_0/var"] == P()
    assert specs["params/BatchNorm_0/scale"] == P("model")
    assert specs["params/head/kernel"] == P()
    assert list(specs) == [p for p, _ in paths.flatten(shapes_of(Plain()))[0]]
    assert sharding_lib.rule_path("params/a/b") == "a/b"
    assert sharding_lib.rule_path("cache/a/b") == "cache/a/b"


def test_first_match_wins_regex_mapping_and_nested_forms():
    mesh = make_mesh((2,), ("model",))
    shapes = shapes_of(Plain())
    as_list = [(re.compile(r"up/(kernel|bias)"), P("model")), ("**", P())]
    as_map = {re.compile(r"up/(kernel|bias)"): P("model"), "**": P()}
    for rules in (as_list, as_map):
        specs = sharding_lib.partition_specs(shapes, mesh, partition_rules=rules)
        assert specs["params/up/kernel"] == P("model")
        assert specs["params/up/bias"] == P("model")
        assert specs["params/head/kernel"] == P()
    nested = {
        "Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
        "up": {"kernel": P("model"), "bias": P()},
        "BatchNorm_0": P(), "head": P(), "batch_stats": P(),  # whole subtrees
    }
    specs = sharding_lib.partition_specs(shapes, mesh, partition_rules=nested)
    assert specs["params/Dense_0/kernel"] == P(None, "model")
    assert specs["params/Dense_0/bias"] == P("model")
    assert specs["params/up/kernel"] == P("model")
    assert specs["batch_stats/BatchNorm_0/var"] == P()


def test_partitioned_and_logical_annotations_without_rules():
    mesh = make_mesh((2, 4), ("data", "model"))
    specs = sharding_lib.partition_specs(
        shapes_of(Annotated()), mesh, logical_axis_rules=logical_rules(mesh)
    )
    assert specs == {
        "params/down/bias": P("data"),
        "params/down/kernel": P("model", "data"),
        # nn.scan inserted the 'layers' axis in front, mapped to None by the rules.
        "params/layers/Dense_0/bias": P(None, "model"),
        "params/layers/Dense_0/kernel": P(None, "data", "model"),
        "params/layers/Dense_1/bias": P(None, "data"),
        "params/layers/Dense_1/kernel": P(None, "model", "data"),
        "params/proj/bias": P("model"),
        "params/proj/kernel": P(None, "model"),
        "params/temperature": P(),
    }


def test_logical_rules_from_flax_context_and_priority_order():
    mesh = make_mesh((2, 4), ("data", "model"))
    shapes = shapes_of(Annotated())
    with nn.logical_axis_rules(logical_rules(mesh)):
        from_context = sharding_lib.partition_specs(shapes, mesh)
    assert from_context == sharding_lib.partition_specs(
        shapes, mesh, logical_axis_rules=logical_rules(mesh)
    )
    # As in Flax: a mesh axis already taken by an earlier rule is not used twice.
    specs = sharding_lib.partition_specs(
        shapes, mesh, logical_axis_rules=[("layers", "data"), ("mlp", "model"), ("embed", "data")]
    )
    assert specs["params/layers/Dense_0/kernel"] == P("data", None, "model")
    assert specs["params/down/kernel"] == P("model", "data")


def test_scan_stacked_axis_can_be_sharded():
    mesh = make_mesh((4, 2), ("layers", "model"))
    specs = sharding_lib.partition_specs(
        shapes_of(Annotated()), mesh,
        logical_axis_rules=[("layers", "layers"), ("mlp", "model"), ("embed", None)],
    )
    assert specs["params/layers/Dense_1/kernel"] == P("layers", "model", None)


def test_rules_override_annotations_and_none_keeps_them():
    mesh = make_mesh((2, 4), ("data", "model"))
    shapes = shapes_of(Annotated())
    lr = logical_rules(mesh)
    specs = sharding_lib.partition_specs(
        shapes, mesh, partition_rules=[("proj/kernel", P("data", "model"))], logical_axis_rules=lr
    )
    assert specs["params/proj/kernel"] == P("data", "model")
    assert specs["params/proj/bias"] == P("model")  # annotation, no rule
    # A catch-all replicates everything, annotated leaves included...
    specs = sharding_lib.partition_specs(shapes, mesh, partition_rules=[("**", P())])
    assert set(specs.values()) == {P()}
    # ...unless ('**', None) first keeps the annotations.
    specs = sharding_lib.partition_specs(
        shapes, mesh, partition_rules=[("**", None), ("**", P())], logical_axis_rules=lr
    )
    assert specs["params/proj/kernel"] == P(None, "model")
    # An overridden logical annotation is never resolved: no logical rules needed.
    specs = sharding_lib.partition_specs(
        shapes, mesh, partition_rules=[("layers/**", P()), ("down/*", P()), ("**", None)]
    )
    assert specs["params/layers/Dense_0/kernel"] == P()


def test_scalars_are_replicated_and_rules_written_for_them_checked():
    mesh = make_mesh((2,), ("model",))
    shapes = {"params": {"t": jax.ShapeDtypeStruct((), jnp.float32),
                         "w": jax.ShapeDtypeStruct((4,), jnp.float32)}, "cache": {"i": 3}}
    specs = sharding_lib.partition_specs(shapes, mesh)
    assert specs == {"cache/i": P(), "params/t": P(), "params/w": P()}
    # A broad rule that also shards an array leaves the scalars replicated...
    specs = sharding_lib.partition_specs(shapes, mesh, partition_rules=[("**", P("model"))])
    assert specs == {"cache/i": P(), "params/t": P(), "params/w": P("model")}
    specs = sharding_lib.partition_specs(shapes, mesh, partition_rules=[("t", P()), ("**", P())])
    assert specs["params/t"] == P()
    # ... but a rule that only scalars take must fit one, and a mesh axis must exist.
    for rules, match in (
        ([("t", P("model")), ("**", P())],
         r"pattern 't' gives 'params/t' \(float32\[\]\) the spec P\('model',\), but the "
         r"spec has 1 entries for an array of 0 dimension\(s\).*can only be replicated"),
        ([("cache/**", P("tensor")), ("**", P())],
         r"pattern 'cache/\*\*' gives 'cache/i' \(int64\[\]\).*no axis 'tensor'"),
    ):
        with pytest.raises(ValueError, match=match):
            sharding_lib.partition_specs(shapes, mesh, partition_rules=rules)
    problems = []
    chosen = sharding_lib.choose(shapes, mesh, partition_rules=[("t", P("model")),
                                                                  ("**", P())],
                                 problems=problems)
    assert chosen["params/t"].kind == sharding_lib.FAILED
    assert [kind for kind, _ in problems] == [sharding_lib.PROBLEM_BAD_SPEC]


def test_box_own_rules_and_concrete_trees():
    mesh = make_mesh((2,), ("model",))
    own_rules = (("a", "model"), ("b", None))
    box = nn.LogicallyPartitioned(jnp.zeros((4, 6)), ("a", "b"), rules=own_rules)
    specs = sharding_lib.partition_specs({"params": {"w": box}}, mesh)
    assert specs == {"params/w": P("model", None)}
    # Concrete arrays work as well as abstract ones (e.g. a loaded checkpoint).
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes_of(Plain()))
    specs = sharding_lib.partition_specs(variables, mesh, partition_rules=plain_rules(mesh))
    assert specs["params/up/kernel"] == P(None, "model")


# --------------------------------------------------------------------------
# No rules: shard exactly as Flax does; unannotated leaves replicated.


class LogicalHalf(nn.Module):
    """Logical annotations on the kernels only: biases and batch stats are unannotated."""

    @nn.compact
    def __call__(self, x):
        k = with_logical(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(64, kernel_init=k, name="up")(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        k = with_logical(nn.initializers.lecun_normal(), ("mlp", "embed"))
        return nn.Dense(16, kernel_init=k, name="down")(x)


class PartitionedHalf(nn.Module):
    """``nn.with_partitioning`` (mesh axes) on one kernel; the rest unannotated."""

    @nn.compact
    def __call__(self, x):
        k = with_parts(nn.initializers.lecun_normal(), (None, "model"))
        x = nn.Dense(64, kernel_init=k, name="up")(x)
        return nn.Dense(16, name="down")(x)


LOGICAL = [("batch", "data"), ("embed", "data"), ("mlp", "model")]


def flax_shardings(model, mesh, logical_axis_rules=None):
    """What Flax itself gives: nn.get_partition_spec, then nn.logical_to_mesh_sharding."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(X.shape))
    specs = nn.get_partition_spec(boxed)
    if logical_axis_rules is None:  # nn.with_partitioning names are mesh axes
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, P))
    return nn.logical_to_mesh_sharding(specs, mesh, logical_axis_rules)


@needs_8
@pytest.mark.parametrize("model, logical", [(LogicalHalf(), LOGICAL), (PartitionedHalf(), None)],
                         ids=["logical", "partitioned"])
def test_annotated_model_without_rules_shards_as_flax(model, logical):
    mesh = make_mesh((2, 4), ("data", "model"))
    key = jax.random.key(0)
    want = flax_shardings(model, mesh, logical)
    got = flaxlazy.shardings(shapes_of(model), mesh, logical_axis_rules=logical)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = want
        for k in path:
            w = w[k.key]
        assert g == w, jax.tree_util.keystr(path)
    # Unannotated leaves (biases, batch stats) are replicated, as in Flax.
    assert got["params"]["down"]["bias"].spec == P()
    # materialize places every leaf there, with jit(model.init)'s values.
    variables = flaxlazy.materialize(model, key, X, mesh=mesh, logical_axis_rules=logical)
    reference = jax.jit(model.init, out_shardings=want)(key, jnp.zeros(X.shape))
    arrays = nn.meta.unbox(variables)
    chex.assert_trees_all_equal(arrays, nn.meta.unbox(reference))
    shardings_got = jax.tree.map(lambda a: a.sharding, arrays)
    assert shardings_got == jax.tree.map(lambda a: a.sharding, nn.meta.unbox(reference))


def test_require_rules():
    mesh = make_mesh((2, 4), ("data", "model"))
    shapes = shapes_of(LogicalHalf())
    lr = LOGICAL
    # No rules: not required, uncovered leaves replicated (and reported as such).
    chosen = sharding_lib.choose(shapes, mesh, logical_axis_rules=lr)
    assert chosen["params/up/bias"] == (P(), chosen["params/up/bias"].source, "default")
    assert chosen["params/up/kernel"].kind == "annotation"
    # require_rules=True: every leaf needs a rule or an annotation.
    with pytest.raises(ValueError, match=r"`partition_rules`: no partition rule matches "
                                         r"'batch_stats/BatchNorm_0/mean', .*'up/bias' and they "
                                         r"carry no Flax.*`require_rules=False`"):
        sharding_lib.partition_specs(shapes, mesh, logical_axis_rules=lr, require_rules=True)
    # Rules given: required by default (a forgotten rule is an error)...
    rules = [("down/bias", P("model"))]
    with pytest.raises(ValueError, match=r"no partition rule matches 'batch_stats/BatchNorm_0/"):
        sharding_lib.partition_specs(shapes, mesh, partition_rules=rules, logical_axis_rules=lr)
    # ...unless require_rules=False.
    specs = sharding_lib.partition_specs(
        shapes, mesh, partition_rules=rules, logical_axis_rules=lr, require_rules=False
    )
    assert specs["params/down/bias"] == P("model")
    assert specs["params/up/bias"] == P() and specs["batch_stats/BatchNorm_0/mean"] == P()
    assert specs["params/up/kernel"] == P("data", "model")


# --------------------------------------------------------------------------
# Paths as summary prints them work as patterns.


@needs_8
def test_collection_qualified_partition_rules():
    mesh = make_mesh((2, 4), ("data", "model"))
    key = jax.random.key(0)
    short = [("up/kernel", P(None, "model")), ("**", P())]
    for rules in (
        [("params/up/kernel", P(None, "model")), ("**", P())],
        [("params/up/**", None), ("params/up/kernel", P(None, "model")), ("**", P())],
        [(re.compile(r"params/up/kernel"), P(None, "model")), ("**", P())],
        [(re.compile(r"up/kernel"), P(None, "model")), ("**", P())],
        {"params": {"up": {"kernel": P(None, "model"), "bias": P()}, "Dense_0": P(),
                    "BatchNorm_0": P(), "head": P()}, "batch_stats": P()},
    ):
        assert sharding_lib.partition_specs(shapes_of(Plain()), mesh, partition_rules=rules) == (
            sharding_lib.partition_specs(shapes_of(Plain()), mesh, partition_rules=short)
        ), rules
    # Through the public API, with the path exactly as summary prints it.
    printed = next(r.split()[0] for r in flaxlazy.summary(shapes_of(Plain())).splitlines()
                   if r.startswith("params/up/kernel"))
    rules = [(printed, P(None, "model")), ("params/**", P()), ("batch_stats/**", P())]
    tree = flaxlazy.shardings(shapes_of(Plain()), mesh, partition_rules=rules)
    assert tree["params"]["up"]["kernel"].spec == P(None, "model")
    variables = flaxlazy.materialize(Plain(), key, X, mesh=mesh, partition_rules=rules)
    assert variables["params"]["up"]["kernel"].sharding.spec == P(None, "model")
    assert variables["params"]["head"]["kernel"].sharding.spec == P()
    with pytest.raises(ValueError, match=r"key 'params/\*\*' of the nested-dict form .* "
                                         r"contains '\*'"):
        flaxlazy.shardings(shapes_of(Plain()), mesh,
                           partition_rules={"params": {"**": P()}, "batch_stats": P()})
    # A qualified glob never matches another collection.
    with pytest.raises(ValueError, match=r"no partition rule matches 'batch_stats/BatchNorm_0/"):
        flaxlazy.shardings(shapes_of(Plain()), mesh, partition_rules=[("params/**", P())])


# --------------------------------------------------------------------------
# Errors.


ERRORS = [
    pytest.param(
        Plain, [("**/kernel", P()), ("batch_stats/**", P())], None,
        r"no partition rule matches 'BatchNorm_0/bias', 'BatchNorm_0/scale', 'Dense_0/bias', "
        r"'head/bias', 'up/bias' and they carry no "
        r"Flax partitioning annotation.*catch-all \('\*\*', PartitionSpec\(\)\)",
        id="unpartitioned",
    ),
    pytest.param(
        Plain, [("up/kernel", P(None, "tensor")), ("**", P())], None,
        r"`partition_rules`: pattern 'up/kernel' gives 'params/up/kernel' \(float32\[32,64\]\) "
        r"the spec P\(None, 'tensor'\), but the mesh has no axis 'tensor'\. Mesh axis sizes: "
        r"\{'data': 2, 'model': 4\}",
        id="unknown-axis",
    ),
    pytest.param(
        Plain, [("**/bias", P(None, "model")), ("**", P())], None,
        r"pattern '\*\*/bias' gives 'params/BatchNorm_0/bias' \(float32\[32\]\) the spec "
        r"P\(None, 'model'\), but the spec "
        r"has 2 entries for an array of 1 dimension",
        id="too-many-dims",
    ),
    pytest.param(
        Plain, [("head/kernel", P(None, ("data", "model"))), ("**", P())], None,
        r"'params/head/kernel' \(float32\[64,6\]\).*dimension 1 \(size 6\) is not divisible by "
        r"8 = 'data' \(2\) x 'model' \(4\)\. Mesh axis sizes: \{'data': 2, 'model': 4\}",
        id="not-divisible",
    ),
    pytest.param(
        Plain, [("up/kernel", P("model", "model")), ("**", P())], None,
        r"mesh axis 'model' is used for more than one dimension",
        id="axis-twice",
    ),
    pytest.param(
        Plain, [("up/kernel", P(P.UNCONSTRAINED)), ("**", P())], None,
        r"dimension 0 is UNCONSTRAINED",
        id="unconstrained",
    ),
    pytest.param(
        Plain, [("Dense_9/kernel", P()), ("**", P())], None,
        r"`partition_rules`: pattern 'Dense_9/kernel' matches no parameter\. Closest real paths: "
        r"'Dense_0/kernel'",
        id="unused-rule",
    ),
    pytest.param(
        Plain, [("params/Dense_9/**", P("model")), ("**", P())], None,
        r"pattern 'params/Dense_9/\*\*' matches no parameter\. Closest real paths: "
        r"'params/Dense_0/",
        id="qualified-unused-rule-hints-qualified-paths",
    ),
    pytest.param(
        Annotated, [], [("layers", None), ("mlp", "model")],
        r"'params/down/bias' is annotated with logical axes \('embed',\) "
        r"\(nn.LogicallyPartitioned\), but `logical_axis_rules` has no rule for 'embed'.*"
        r"\[\('embed', None\)\]",
        id="unmapped-logical-axis",
    ),
    pytest.param(
        Annotated, [], [("layers", "layers"), ("mlp", "model"), ("embed", None)],
        r"nn.LogicallyPartitioned\('layers', 'mlp'\) via logical_axis_rules gives "
        r"'params/layers/Dense_0/bias' \(float32\[4,64\]\).*no axis 'layers'",
        id="logical-to-missing-mesh-axis",
    ),
]


@pytest.mark.parametrize("model, rules, logical, match", ERRORS)
def test_errors(model, rules, logical, match):
    mesh = make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=match):
        sharding_lib.partition_specs(
            shapes_of(model()), mesh, partition_rules=rules, logical_axis_rules=logical
        )


def test_partitioned_annotation_naming_a_missing_mesh_axis():
    mesh = make_mesh((2,), ("data",))
    with pytest.raises(ValueError, match=r"nn.Partitioned\('model',\) gives "
                                         r"'params/proj/bias' \(float32\[32\]\) the spec "
                                         r"P\('model',\), but the mesh has no axis 'model'\. "
                                         r"Mesh axis sizes: \{'data': 2\}"):
        sharding_lib.partition_specs(
            shapes_of(Annotated()), mesh,
            logical_axis_rules=[("layers", None), ("embed", "data"), ("mlp", None)],
        )


def test_unpartitioned_with_annotations_suggests_keeping_them():
    mesh = make_mesh((2, 4), ("data", "model"))

    class Half(nn.Module):
        @nn.compact
        def __call__(self, x):
            k = with_parts(nn.initializers.lecun_normal(), (None, "model"))
            return nn.Dense(16, kernel_init=k)(x)

    with pytest.raises(ValueError, match=r"'Dense_0/bias'.*end with \[\.\.\., \('\*\*', None\), "):
        sharding_lib.partition_specs(shapes_of(Half()), mesh, require_rules=True)
    specs = sharding_lib.partition_specs(
        shapes_of(Half()), mesh, partition_rules=[("**", None), ("**", P())]
    )
    assert specs == {"params/Dense_0/bias": P(), "params/Dense_0/kernel": P(None, "model")}


def test_unused_rules_opt_out_and_bad_rule_values():
    mesh = make_mesh((2,), ("model",))
    shapes = shapes_of(Plain())
    rules = [("encoder/**", P("model")), ("**", P())]
    specs = sharding_lib.partition_specs(
        shapes, mesh, partition_rules=rules, allow_unused_rules=True
    )
    assert set(specs.values()) == {P()}
    with pytest.raises(TypeError, match=r"`partition_rules`: pattern '\*\*' maps to tuple "
                                        r"\('model',\); expected a jax.sharding.PartitionSpec.*"
                                        r"Maybe you meant PartitionSpec\('model',\)\?"):
        sharding_lib.partition_specs(shapes, mesh, partition_rules=[("**", ("model",))])


# --------------------------------------------------------------------------
# The shardings tree.


def test_shardings_tree_feeds_jit():
    mesh = make_mesh((2, 4), ("data", "model"))
    model, key = Annotated(), jax.random.key(0)
    shapes = shapes_of(model)
    tree = sharding_lib.shardings(shapes, mesh, logical_axis_rules=logical_rules(mesh))
    flat_tree = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert all(isinstance(s, NamedSharding) for _, s in flat_tree)
    assert jax.tree.structure(tree) == jax.tree.structure(nn.meta.unbox(shapes))
    assert tree["params"]["proj"]["kernel"] == NamedSharding(mesh, P(None, "model"))

    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros(X.shape))), out_shardings=tree)
    expected = init(key)
    for leaf, sharding in zip(jax.tree.leaves(expected), jax.tree.leaves(tree), strict=True):
        assert leaf.sharding == sharding
    specs = sharding_lib.partition_specs(shapes, mesh, logical_axis_rules=logical_rules(mesh))
    _, got = materialize_sharded(model, key, X, named(specs, mesh))
    chex.assert_trees_all_equal(nn.meta.unbox(got), expected)


# --------------------------------------------------------------------------
# End to end: the plan and engine create every leaf in its shards.


MESHES = [
    pytest.param((1,), ("model",), id="1"),
    pytest.param((8,), ("model",), id="8"),
    pytest.param((2, 4), ("data", "model"), id="2x4"),
    pytest.param((4, 2), ("data", "model"), id="4x2"),
]


@pytest.fixture(scope="module")
def references():
    key = jax.random.key(0)
    x = jnp.zeros(X.shape, X.dtype)
    models = {"plain": Plain(), "annotated": Annotated()}
    return {name: jax.jit(m.init)(key, x) for name, m in models.items()}


@pytest.mark.parametrize("shape, names", MESHES)
@pytest.mark.parametrize("kind", ["plain", "annotated"])
def test_sharded_materialization(shape, names, kind, references):
    mesh = make_mesh(shape, names)
    key = jax.random.key(0)
    model = Plain() if kind == "plain" else Annotated()
    if kind == "plain":  # rules only
        rules = dict(partition_rules=plain_rules(mesh))
    else:  # annotations only
        rules = dict(logical_axis_rules=logical_rules(mesh))
    specs = sharding_lib.partition_specs(shapes_of(model), mesh, **rules)
    requested = named(specs, mesh)
    plan, got = materialize_sharded(model, key, X, requested)
    assert [leaf.sharding for leaf in plan.leaves] == list(requested.values())
    if kind == "annotated":
        # the scan stack: a key per layer, each leaf one compiled function, sharded too
        assert plan.counts() == {"flax": len(plan.leaves)}
        assert any(leaf.layers for leaf in plan.leaves)

    chex.assert_trees_all_equal_structs(got, references[kind])
    arrays, expected = flat_arrays(got), flat_arrays(references[kind])
    for path, array in arrays.items():
        assert array.sharding == requested[path], path
        shard_shape = requested[path].shard_shape(array.shape)
        assert len(array.addressable_shards) == mesh.size
        for shard in array.addressable_shards:
            assert shard.data.shape == shard_shape, path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected[path]), err_msg=path)


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(1024, name="up")(x)
        return nn.Dense(256, kernel_init=nn.initializers.normal(0.02), name="down")(x)


@needs_8
def test_no_full_copy_on_any_device():
    mesh = make_mesh((8,), ("model",))
    model, key, spec = Wide(), jax.random.key(0), flaxlazy.spec("f32[2,256]")
    specs = sharding_lib.partition_specs(
        shapes_of(model, spec), mesh,
        partition_rules=[("up/kernel", P(None, "model")), ("down/kernel", P("model")),
                         ("**/bias", P("model"))],
    )
    plan, got = materialize_sharded(model, key, spec, named(specs, mesh))
    total = sum(leaf.shape and math.prod(leaf.shape) * 4 for leaf in plan.leaves)
    # Each leaf's compiled initializer (its recipe, jit-compiled with its sharding, as the
    # engine does): per device, the output is one shard and the scratch space a small
    # multiple of it, never the full parameter.
    for leaf in plan.leaves:
        assert leaf.source == "flax", leaf.path
        key_spec = None if leaf.key is None else jax.ShapeDtypeStruct((), key.dtype)
        run = functools.partial(programs.runner(leaf.program), leaf.program.runtime_consts)
        compiled = jax.jit(run, out_shardings=leaf.sharding).lower(key_spec).compile()
        stats = compiled.memory_analysis()
        full = math.prod(leaf.shape) * 4
        shard = summary_lib.per_device_bytes(leaf.shape, leaf.dtype, leaf.sharding)
        assert shard == full // 8
        assert stats.output_size_in_bytes == shard, leaf.path
        assert stats.output_size_in_bytes + stats.temp_size_in_bytes <= 5 * shard, leaf.path
    # The live buffers: each device holds exactly total / 8.
    per_device = {d: 0 for d in mesh.devices.flat}
    for array in flat_arrays(got).values():
        for shard in array.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert set(per_device.values()) == {total // 8}


@needs_8
def test_compiles_once_per_signature_with_shardings():
    def run(depth, kernel_spec):
        mesh = make_mesh((8,), ("model",))
        model = models.DenseStack(depth)
        specs = sharding_lib.partition_specs(
            shapes_of(model), mesh, partition_rules=[("**/kernel", kernel_spec), ("**", P())]
        )
        materialize_sharded(model, jax.random.key(0), X, named(specs, mesh))

    run(2, P(None, "model"))  # warms the shared signatures and the key derivation
    with count_compiles() as c:
        run(9, P(None, "model"))
    assert c.count <= 1  # at most the key derivation for the new number of keys
    with count_compiles() as c:
        run(9, P("model", None))
    assert c.count == 1  # the sharding is part of the signature: one new kernel program
