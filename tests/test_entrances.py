"""entrances: one table of framework entrances, consulted once per public call."""

import flax.linen as nn
import jax
import pytest
from flax import nnx

import flaxlazy
from flaxlazy._src import entrances
from flaxlazy._src import placement
from flaxlazy._src import traced_call

X = flaxlazy.spec("f32[2,5]")


@pytest.mark.parametrize(
    "target, name",
    [
        pytest.param(nn.Dense(3), "linen", id="linen-instance"),
        pytest.param(nn.Dense, "linen", id="linen-class"),  # check() then explains
        pytest.param(nnx.Linear, "nnx", id="nnx-class"),
        pytest.param(lambda rngs: nnx.Linear(2, 3, rngs=rngs), "nnx", id="factory"),
    ],
)
def test_each_target_finds_one_entrance(target, name):
    entrance = entrances.find(target, fn="materialize")
    assert entrance.name == name
    assert [e.name for e in entrances.ENTRANCES if e.accepts(target)][0] == name


@pytest.mark.parametrize("target, got", [(3, "int 3"), ("Dense", "str 'Dense'"),
                                         (None, "NoneType None")])
def test_a_target_no_entrance_takes_names_what_each_takes(target, got):
    with pytest.raises(TypeError) as info:
        entrances.find(target, fn="abstract_init")
    message = str(info.value)
    assert message.startswith("abstract_init: `module` must be ")
    for entrance in entrances.ENTRANCES:
        assert entrance.describes in message
    assert message.endswith(f"got {got}.")
    for fn in (flaxlazy.materialize, flaxlazy.abstract_init):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: `module` must be a "
                                            r"flax\.linen\.Module instance .*got"):
            fn(target, jax.random.key(0), X)


@pytest.mark.parametrize("abstract", [True, False])
def test_linen_trace_hands_the_stages_a_traced_call(abstract):
    place = placement.Placement.from_args(fn="f")
    key = jax.random.key(0)
    with entrances.LINEN.session(abstract):
        call = entrances.LINEN.trace(nn.Dense(3), (key, X), {}, fn="f", placement=place,
                                     options={}, abstract=abstract)
    assert isinstance(call, traced_call.TracedCall)
    assert call.variables["params"]["kernel"].shape == (5, 3)
    assert call.keys is key and len(call.inputs) == 1
    assert call.build(call.variables) is call.variables


def test_nnx_trace_builds_the_module():
    place = placement.Placement.from_args(fn="f")
    call = entrances.NNX.trace(nnx.Linear, (5, 3), {"rngs": nnx.Rngs(0)}, fn="f",
                               placement=place, options={}, abstract=True)
    model = call.build(call.variables)
    assert isinstance(model, nnx.Linear) and model.kernel.shape == (5, 3)


def test_nnx_rejects_linen_options_through_the_table():
    with pytest.raises(TypeError, match=r"f: `method` is an option of Linen's Module.init"):
        entrances.NNX.trace(nnx.Linear, (5, 3), {"rngs": nnx.Rngs(0)}, fn="f",
                            placement=placement.Placement.from_args(fn="f"),
                            options={"method": "encode"}, abstract=True)


def test_lazy_apply_comes_from_the_entrance():
    module = nn.Dense(3)
    assert entrances.LINEN.apply(module) == module.apply
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    x = jax.numpy.ones((1, 2))
    assert (entrances.NNX.apply(nnx.Linear)(model, x) == model(x)).all()


@pytest.mark.parametrize("entrance, target, args, kwargs", [
    pytest.param(entrances.LINEN, nn.Dense(3), (jax.random.key(0), X), {}, id="linen"),
    pytest.param(entrances.NNX, nnx.Linear, (5, 3), {"rngs": nnx.Rngs(0)}, id="nnx"),
])
def test_an_abstract_trace_records_for_a_plan_when_asked(entrance, target, args, kwargs):
    # inspect's trace: shapes only (the caller's objects untouched), yet planned from.
    place = placement.Placement.from_args(fn="f")
    rngs = kwargs.get("rngs")
    before = None if rngs is None else [
        (p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(rngs))]
    bare = entrance.trace(target, args, dict(kwargs), fn="f", placement=place, options={},
                          abstract=True)
    call = entrance.trace(target, args, dict(kwargs), fn="f", placement=place, options={},
                          abstract=True, record=True)
    assert not bare.records.records and call.records.records
    assert call.keys is None or call.keys is args[0]
    assert call.records.rngs_update_compiles is False
    if rngs is not None:
        after = [(p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(rngs))]
        assert after == before


@pytest.mark.parametrize("entrance, target, args, kwargs", [
    pytest.param(entrances.LINEN, nn.Dense(3), (jax.random.key(0), X), {}, id="linen"),
    pytest.param(entrances.NNX, nnx.Linear, (5, 3), {"rngs": nnx.Rngs(0)}, id="nnx"),
])
def test_an_abstract_trace_gives_the_train_states_optimizer(entrance, target, args, kwargs):
    import optax

    place = placement.Placement.from_args(fn="f")
    call = entrance.trace(target, args, dict(kwargs), fn="f", placement=place, options={},
                          abstract=True)
    values = dict(flaxlazy._src.paths.flatten(call.variables)[0])
    opt, params, step = call.abstract_optimizer(optax.adam(1e-3), values)
    assert params["kernel"].shape == (5, 3) and params["bias"].shape == (3,)
    mu = opt[0].mu if entrance is entrances.LINEN else opt["0"]["mu"]
    assert mu["kernel"].shape == (5, 3)
    assert step.shape == () and jax.numpy.issubdtype(step.dtype, jax.numpy.integer)
