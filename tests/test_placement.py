"""materialize / abstract_init / summary on a mesh: the public wiring of sharding."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src import paths
from flaxlazy._src import placement

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

X = flaxlazy.spec("f32[8,32]")


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        kernel_init = nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None))
        return nn.Dense(16, kernel_init=kernel_init)(x)


RULES = [("Dense_0/kernel", P(None, "model")), ("**", None), ("**", P())]


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def test_materialize_on_mesh_matches_init_and_requested_shardings(mesh):
    key = jax.random.key(0)
    got = flaxlazy.materialize(Model(), key, X, mesh=mesh, partition_rules=RULES)
    want = jax.jit(Model().init)(key, jnp.zeros(X.shape))
    chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(want))
    expected = flaxlazy.shardings(
        flaxlazy.abstract_init(Model(), key, X), mesh, partition_rules=RULES
    )
    kernel = got["params"]["Dense_0"]["kernel"]
    assert kernel.sharding == expected["params"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 16)}
    boxed = got["params"]["Dense_1"]["kernel"]
    assert isinstance(boxed, nn.Partitioned) and boxed.value.sharding.spec == P("model", None)
    assert got["batch_stats"]["BatchNorm_0"]["mean"].sharding.spec == P()


def test_abstract_init_carries_the_same_shardings(mesh):
    key = jax.random.key(0)
    shapes = flaxlazy.abstract_init(Model(), key, X, mesh=mesh, partition_rules=RULES)
    values = flaxlazy.materialize(Model(), key, X, mesh=mesh, partition_rules=RULES)
    a = jax.tree.leaves(shapes)
    b = jax.tree.leaves(values)
    assert [s.sharding for s in a] == [v.sharding for v in b]


def test_summary_reports_bytes_per_device(mesh):
    shapes = flaxlazy.abstract_init(Model(), jax.random.key(0), X, mesh=mesh, partition_rules=RULES)
    table = flaxlazy.summary(shapes)
    assert "per device" in table.splitlines()[0]
    kernel_row = next(r for r in table.splitlines() if r.startswith("params/Dense_0/kernel"))
    assert "(None, 'model')" in kernel_row and kernel_row.endswith("2.0 KiB")
    assert table.splitlines()[-1].startswith("largest per-device load: 4.3 KiB on each of 8")
    plain = flaxlazy.abstract_init(Model(), jax.random.key(0), X)
    assert flaxlazy.summary(plain, mesh=mesh, partition_rules=RULES) == table


def test_shardings_tree_and_device_sharding(mesh):
    key = jax.random.key(0)
    tree = flaxlazy.shardings(flaxlazy.abstract_init(Model(), key, X), mesh, partition_rules=RULES)
    got = flaxlazy.materialize(Model(), key, X, shardings=tree)
    for leaf, sh in zip(jax.tree.leaves(got), jax.tree.leaves(tree), strict=True):
        assert leaf.sharding == sh
    replicated = NamedSharding(mesh, P())
    got = flaxlazy.materialize(Model(), key, X, device=replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(got))


def test_placement_argument_errors(mesh):
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="only one of `device`, `shardings` and `mesh`"):
        flaxlazy.materialize(Model(), key, X, device=jax.devices()[0], mesh=mesh)
    with pytest.raises(TypeError, match="need a `mesh=`"):
        flaxlazy.materialize(Model(), key, X, partition_rules=RULES)
    with pytest.raises(TypeError, match="need a `mesh=`"):
        flaxlazy.abstract_init(Model(), key, X, partition_rules=RULES)
    with pytest.raises(ValueError, match="no partition rule matches .*'Dense_0/bias'"):
        flaxlazy.materialize(Model(), key, X, mesh=mesh, partition_rules=[("**/kernel", P())])


def test_lazy_init_on_mesh(mesh):
    net = flaxlazy.lazy(Model())
    got = net.init(jax.random.key(0), X, mesh=mesh, partition_rules=RULES)
    assert got["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "model")


def test_broadcast_prefix_trees(mesh):
    f32 = jnp.float32
    shapes = {
        "params": {"u": jax.ShapeDtypeStruct((8, 4), f32), "w": jax.ShapeDtypeStruct((6,), f32)},
        "batch_stats": {"m": jax.ShapeDtypeStruct((16,), f32)},
    }
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("model"))
    flat = placement.broadcast(rep, shapes)
    assert list(flat) == [p for p, _ in paths.flatten(shapes)[0]] and set(flat.values()) == {rep}
    flat = placement.broadcast({"params": rep, "batch_stats": split}, shapes)
    assert flat["batch_stats/m"] == split and flat["params/u"] == rep
    flat = placement.broadcast({"params": None, "batch_stats": rep}, shapes)
    assert flat["params/u"] is None
    scalar = {"params": {"t": jax.ShapeDtypeStruct((), f32)}}
    assert placement.broadcast(split, scalar)["params/t"].spec == P()
    with pytest.raises(ValueError, match=r"pytree prefix of the variables tree"):
        placement.broadcast({"parms": rep}, shapes)
    with pytest.raises(ValueError, match=r"`shardings` gives 'params/w' \(float32\[6\]\)"
                                         r" the spec P\(\('data', 'model'\),\)"):
        placement.broadcast(NamedSharding(mesh, P(("data", "model"))), shapes)


def test_options_without_a_mesh_are_errors_not_ignored():
    shapes = flaxlazy.abstract_init(Model(), jax.random.key(0), X)
    with pytest.raises(TypeError, match=r"`require_rules` need a `mesh=`; got no mesh, so they "
                                        r"would be ignored"):
        placement.resolve(shapes, require_rules=True)
    with pytest.raises(TypeError, match=r"`partition_rules` and `logical_axis_rules` need a"):
        placement.resolve(shapes, partition_rules=[], logical_axis_rules=[])
    with pytest.raises(TypeError, match=r"`mesh` must be a jax\.sharding\.Mesh, got AbstractMesh"):
        placement.resolve(shapes, mesh=jax.sharding.AbstractMesh((8,), ("model",)))


def test_require_rules_through_resolve(mesh):
    shapes = flaxlazy.abstract_init(Model(), jax.random.key(0), X)
    # No rules: the annotated Dense_1 kernel follows its annotation, the rest is replicated.
    got = placement.resolve(shapes, mesh=mesh)
    assert got["params/Dense_1/kernel"].spec == P("model", None)
    assert got["params/Dense_0/kernel"].spec == P()
    assert got["batch_stats/BatchNorm_0/mean"].spec == P()
    with pytest.raises(ValueError, match=r"no partition rule matches .*'Dense_0/kernel'"):
        placement.resolve(shapes, mesh=mesh, require_rules=True)


# Paths as summary prints them, and mappings mixing regex and glob keys, as initializers.

ONES = nn.initializers.ones
INITIALIZER_FORMS = [
    {"params/Dense_1/**": ONES},
    {"Dense_1/**": ONES},
    {re.compile(r"params/Dense_1/.*"): ONES},
    {re.compile(r"Dense_1/(kernel|bias)"): ONES},
    {re.compile(r"Dense_1/kernel"): ONES, re.compile(r"Dense_1/bias"): jnp.ones(16)},
    {re.compile(r"Dense_1/kernel"): ONES, "params/Dense_1/bias": jnp.ones(16)},
]


@pytest.mark.parametrize("initializers", INITIALIZER_FORMS)
def test_initializer_patterns_as_summary_prints_them(initializers):
    key = jax.random.key(0)
    got = flaxlazy.materialize(Model(), key, X, initializers=initializers)
    want = Model().init(key, jnp.zeros(X.shape))
    chex.assert_trees_all_equal(got["params"]["Dense_0"], want["params"]["Dense_0"])
    kernel = got["params"]["Dense_1"]["kernel"].value
    chex.assert_trees_all_equal(kernel, jnp.ones_like(kernel))
    chex.assert_trees_all_equal(got["params"]["Dense_1"]["bias"], jnp.ones(16))


def test_printed_path_patterns_on_a_mesh(mesh):
    key = jax.random.key(0)
    shapes = flaxlazy.abstract_init(Model(), key, X)
    printed = [line.split()[0] for line in flaxlazy.summary(shapes).splitlines()
               if line.startswith("params/")]
    assert "params/Dense_0/kernel" in printed
    rules = [("params/Dense_0/kernel", P(None, "model")), ("params/Dense_0/bias", P("model")),
             ("**", None), ("**", P())]
    got = flaxlazy.materialize(Model(), key, X, mesh=mesh, partition_rules=rules,
                               initializers={"params/Dense_0/bias": nn.initializers.ones})
    assert got["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    assert got["params"]["Dense_0"]["bias"].sharding.spec == P("model")
    chex.assert_trees_all_equal(jax.device_get(got["params"]["Dense_0"]["bias"]), np.ones(64))
    tree = flaxlazy.shardings(shapes, mesh, partition_rules=rules)
    assert tree["params"]["Dense_0"]["bias"].spec == P("model")


class _OutSharded(nnx.Module):
    """Sharded the explicit-mode way: ``out_sharding=`` on the calls that create leaves;
    ``big`` is large enough to be drawn in chunks."""

    def __init__(self, *, rngs):
        init = nnx.initializers.lecun_normal()
        self.w = nnx.Param(init(rngs.params(), (16, 64), out_sharding=P(None, "model")))
        self.big = nnx.Param(init(rngs.params(), (1024, 1024), out_sharding=P("data", "model")))
        self.b = nnx.Param(jnp.zeros((64,), out_sharding=P("model")))
        self.plain = nnx.Param(init(rngs.params(), (8, 8)))


def _explicit_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


@pytest.mark.parametrize("how", ["mesh_arg", "mesh_arg_under_set_mesh", "set_mesh_only"])
def test_out_sharding_on_explicit_mesh_matches_nnx_jit(how):
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        want = nnx.state(nnx.jit(lambda: _OutSharded(rngs=nnx.Rngs(0)))())
    if how == "mesh_arg":
        got = flaxlazy.materialize(_OutSharded, rngs=nnx.Rngs(0), mesh=mesh)
        abstract = flaxlazy.abstract_init(_OutSharded, rngs=nnx.Rngs(0), mesh=mesh)
    else:
        with jax.set_mesh(mesh):
            extra = {"mesh": mesh} if how == "mesh_arg_under_set_mesh" else {}
            got = flaxlazy.materialize(_OutSharded, rngs=nnx.Rngs(0), **extra)
            abstract = flaxlazy.abstract_init(_OutSharded, rngs=nnx.Rngs(0), **extra)
    got = nnx.state(got)
    for name in ("w", "big", "b", "plain"):
        g, w = got[name].get_value(), want[name].get_value()
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim), name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        a = nnx.state(abstract)[name].get_value()
        assert a.sharding.is_equivalent_to(w.sharding, g.ndim), name


def test_partition_rules_override_out_sharding():
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        got = flaxlazy.materialize(_OutSharded, rngs=nnx.Rngs(0), mesh=mesh,
                                   partition_rules=[("w", P("model", None)), ("**", None)],
                                   require_rules=False)
    assert got.w.get_value().sharding.spec == P("model", None)
    assert got.b.get_value().sharding.spec == P("model")


class _LinenOutSharded(nn.Module):
    """The Linen twin of ``_OutSharded``: ``out_sharding=`` inside ``self.param``."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        w = self.param("w", lambda k: init(k, (16, 64), out_sharding=P(None, "model")))
        big = self.param("big", lambda k: init(k, (1024, 1024), out_sharding=P("data", "model")))
        b = self.param("b", lambda k: jnp.zeros((64,), out_sharding=P("model")))
        plain = self.param("plain", init, (8, 8))
        return x @ w + b, big, plain


@pytest.mark.parametrize("how", ["mesh_arg", "mesh_arg_under_set_mesh", "set_mesh_only"])
def test_linen_out_sharding_on_explicit_mesh_matches_jit_init(how):
    mesh = _explicit_mesh()
    key, x = jax.random.key(0), flaxlazy.spec("f32[2,16]")
    with jax.set_mesh(mesh):
        want = jax.jit(_LinenOutSharded().init)(key, jnp.zeros(x.shape))["params"]
    if how == "mesh_arg":
        got = flaxlazy.materialize(_LinenOutSharded(), key, x, mesh=mesh)
        abstract = flaxlazy.abstract_init(_LinenOutSharded(), key, x, mesh=mesh)
    else:
        extra = {"mesh": mesh} if how == "mesh_arg_under_set_mesh" else {}
        with jax.set_mesh(mesh):
            got = flaxlazy.materialize(_LinenOutSharded(), key, x, **extra)
            abstract = flaxlazy.abstract_init(_LinenOutSharded(), key, x, **extra)
    for name in ("w", "big", "b", "plain"):
        g, w, a = got["params"][name], want[name], abstract["params"][name]
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (name, g.sharding, w.sharding)
        assert a.sharding.is_equivalent_to(w.sharding, g.ndim), (name, a.sharding, w.sharding)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("entrance", ["linen", "nnx"])
def test_inspect_traces_a_model_naming_mesh_axes_under_its_mesh(entrance):
    """``out_sharding=`` needs the mesh to trace: inspect traces such a model again under
    its mesh, as materialize does, a concrete one or an AbstractMesh (no devices
    needed), and reports each leaf where materialize puts it, from the same plan."""
    mesh = _explicit_mesh()
    if entrance == "nnx":
        module, args, kwargs = _OutSharded, (), {"rngs": nnx.Rngs(0)}
        got = nnx.state(flaxlazy.materialize(_OutSharded, rngs=nnx.Rngs(0), mesh=mesh))
        placed = {f"params/{k}": v.get_value().sharding for k, v in got.items()}
    else:
        module, kwargs = _LinenOutSharded(), {}
        args = (jax.random.key(0), flaxlazy.spec("f32[2,16]"))
        got = flaxlazy.materialize(module, *args, mesh=mesh)
        placed = {f"params/{k}": v.sharding for k, v in got["params"].items()}
    reports = [flaxlazy.inspect(module, *args, mesh=m, **kwargs)
               for m in (mesh, mesh.abstract_mesh)]
    assert reports[0].leaves == reports[1].leaves
    assert reports[0].compiles == reports[1].compiles
    for leaf in reports[1].leaves:
        assert NamedSharding(mesh, leaf.spec).is_equivalent_to(placed[leaf.path], 2), leaf.path
        assert leaf.source == "flax", leaf.path
    assert reports[1].problems == ()


@pytest.mark.parametrize("entrance", ["linen", "nnx"])
def test_inspect_names_a_mesh_axis_the_mesh_lacks_as_materialize_does(entrance):
    """A model naming an axis (``out_sharding=P(None, "model")``) on a mesh without it:
    inspect, on the mesh or its AbstractMesh, raises the ValueError materialize raises."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    if entrance == "nnx":
        module, args, kwargs = _OutSharded, (), {"rngs": nnx.Rngs(0)}
    else:
        module, kwargs = _LinenOutSharded(), {}
        args = (jax.random.key(0), flaxlazy.spec("f32[2,16]"))
    with pytest.raises(ValueError, match=r"model of P\(None, 'model'\) is not found in mesh"):
        flaxlazy.materialize(module, *args, mesh=mesh, **kwargs)
    for m in (mesh, mesh.abstract_mesh):
        with pytest.raises(ValueError, match=r"model of P\(None, 'model'\) is not found"):
            flaxlazy.inspect(module, *args, mesh=m, **kwargs)
