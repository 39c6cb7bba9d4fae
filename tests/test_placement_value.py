"""placement.Placement: the seven placement arguments as one value, checked once."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src import placement

TREE = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()[:1]), ("model",))


def test_placement_is_an_immutable_value(mesh):
    place = placement.Placement.from_args(fn="materialize", mesh=mesh, partition_rules=[])
    assert place.mesh is mesh and place.given_mesh is mesh and place.partition_rules == []
    with pytest.raises(AttributeError):
        place.mesh = None
    assert place == placement.Placement.from_args(fn="materialize", mesh=mesh,
                                                  partition_rules=[])


def test_a_device_becomes_its_sharding():
    device = jax.devices()[0]
    place = placement.Placement.from_args(fn="materialize", device=device)
    assert place.device == jax.sharding.SingleDeviceSharding(device)
    assert place.by_path(TREE)["params/w"] == place.device


def test_the_ambient_mesh_stands_in_for_mesh(mesh):
    assert placement.Placement.from_args(fn="materialize").mesh is None
    with jax.set_mesh(mesh):
        place = placement.Placement.from_args(fn="materialize", partition_rules=[("**", P())])
        assert place.mesh == mesh and place.given_mesh is None
        assert placement.Placement.from_args(fn="f", ambient=False).mesh is None
        with pytest.raises(TypeError, match=r"f: `partition_rules` need a `mesh=`"):
            placement.Placement.from_args(fn="f", partition_rules=[], ambient=False)


@pytest.mark.parametrize(
    "given, match",
    [
        pytest.param(dict(partition_rules=[]), r"^materialize: `partition_rules` need a "
                     r"`mesh=`; got no mesh, so they would be ignored\.$", id="rules"),
        pytest.param(dict(logical_axis_rules=[], require_rules=True),
                     r"^materialize: `logical_axis_rules` and `require_rules` need a `mesh=`",
                     id="two"),
        pytest.param(dict(device=jax.devices()[0], shardings=jax.devices()[0]),
                     r"^materialize: pass only one of `device`, `shardings` and `mesh`; got "
                     r"\['device', 'shardings'\]\.$", id="two-ways"),
        pytest.param(dict(device="cpu"), r"`device` must be a jax\.Device", id="device"),
    ],
)
def test_one_wording_per_error(given, match):
    with pytest.raises(TypeError, match=match):
        placement.Placement.from_args(fn="materialize", **given)


def test_every_public_function_says_needs_a_mesh_alike():
    x = flaxlazy.spec("f32[2,3]")
    for fn in (flaxlazy.materialize, flaxlazy.abstract_init):
        with pytest.raises(TypeError, match=rf"^{fn.__name__}: `require_rules` need a "
                                            r"`mesh=`; got no mesh, so they would be ignored"):
            fn(nn.Dense(3), jax.random.key(0), x, require_rules=True)


def test_for_plan_gives_each_path_its_sharding(mesh):
    place = placement.Placement.from_args(fn=None, mesh=mesh)
    assert place.for_plan(TREE)("params/w", None).spec == P()
    assert placement.Placement.from_args(fn=None).for_plan(TREE) is None


def test_train_states_check_placement_once_with_the_same_wording(mesh):
    tx, x = optax.adam(1e-3), flaxlazy.spec("f32[2,3]")
    with pytest.raises(TypeError, match=r"^abstract_train_state: `partition_rules` need a "
                                        r"`mesh=`; got no mesh, so they would be ignored"):
        flaxlazy.abstract_train_state(nnx.Linear, tx, 3, 4, rngs=nnx.Rngs(0),
                                      partition_rules=[])
    with jax.set_mesh(mesh):  # a Linen train state is laid out on the mesh given alone
        with pytest.raises(TypeError, match=r"^init_train_state: `partition_rules` need a"):
            flaxlazy.init_train_state(nn.Dense(3), tx, jax.random.key(0), x,
                                      partition_rules=[])


def test_init_train_state_traces_the_linen_model_once():
    calls = []

    class Counted(nn.Module):
        @nn.compact
        def __call__(self, x):
            calls.append(1)
            return nn.Dense(3)(x)

    x = flaxlazy.spec("f32[2,5]")
    flaxlazy.materialize(Counted(), jax.random.key(0), x)
    by_materialize, calls[:] = len(calls), []
    state = flaxlazy.init_train_state(Counted(), optax.adam(1e-3), jax.random.key(0), x)
    assert len(calls) == by_materialize  # abstract_init's trace is no longer run besides
    reference = Counted().init(jax.random.key(0), jax.numpy.zeros((2, 5)))["params"]
    assert (state.params["Dense_0"]["kernel"] == reference["Dense_0"]["kernel"]).all()
