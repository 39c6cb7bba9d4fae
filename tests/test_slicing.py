"""``slicing``: the per-leaf programs cut out of one traced NNX constructor jaxpr.

The jaxpr is made as the NNX entrance makes it (``nnx_api.traced``: the constructor under
``jax.make_jaxpr``, the streams' root keys as its first inputs), and each variable's
``slicing.Slice`` is read off its ``Analysis``. Covered: which outputs are cut at a
``fold_in(root, count)`` (replayed alone) and which are left to the traced fallback (a
root key used directly, two keys, an array input, an effect, a value of an enclosing
trace); that a slice's program applied to ``fold_in(root, count)`` gives NNX's own value
bit for bit (also as a property over random layer widths); that equal layers share one
program key, so compile counts stay flat in depth, while different computations never do;
constant folding up to ``FOLD_ELEMENTS``; and ``pruned``, the fallback's whole jaxpr
returning only the outputs asked for.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.experimental import io_callback
from nnx_models import Stacked

from flaxlazy._src import engine
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import programs
from flaxlazy._src import slicing
from flaxlazy._src.compiles import count_compiles
from flaxlazy._src.nnx import api as nnx_api
from flaxlazy._src.sources import compiled

N = slicing.FOLD_ELEMENTS


def analyzed(ctor, *args, seed=0):
    """The entrance's trace of ``ctor(*args, rngs=nnx.Rngs(seed))`` and ``{state path:
    Slice}`` of its array variables."""
    traced = nnx_api.traced(ctor, args, {"rngs": nnx.Rngs(seed)}, fn="test")
    assert isinstance(traced.analysis, slicing.Analysis)
    return traced, {"/".join(map(str, e.state_path)): traced.analysis.slice(e.output)
                    for e in traced.entries if e.output is not None}


def outputs(traced):
    """``{state path: output index}`` of the traced jaxpr."""
    return {"/".join(map(str, e.state_path)): e.output
            for e in traced.entries if e.output is not None}


def reference(ctor, *args, seed=0):
    """NNX's own values: the ``nnx.jit``-ed constructor, ``{state path: array}``."""
    model = nnx.jit(lambda: ctor(*args, rngs=nnx.Rngs(seed)))()
    return {"/".join(map(str, path)): v.get_value() if isinstance(v, nnx.Variable) else v
            for path, v in nnx.to_flat_state(nnx.state(model))}


def replay(s, seed=0):
    """A slice's program alone, compiled: on ``fold_in(key(seed), count)`` when cut."""
    run = jax.jit(programs.runner(s.program))
    if s.cut is None:
        return run(s.program.runtime_consts)
    return run(s.program.runtime_consts, jax.random.fold_in(jax.random.key(seed), s.cut.count))


class Net(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Linear(3, 4, rngs=rngs)
        self.down = nnx.Linear(4, 5, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def test_each_variable_drawn_from_one_stream_key_is_cut_at_its_count():
    traced, slices = analyzed(Net)
    assert traced.call.streams == ("default",)
    # nnx.Linear draws a key for its kernel, then one for its bias: counts 0, 1, 2, 3.
    assert slices["up/kernel"].cut == slicing.Cut(root=0, count=0)
    assert slices["down/kernel"].cut == slicing.Cut(root=0, count=2)
    for path in ("up/bias", "down/bias"):  # zeros ignore their key: keyless, known
        assert slices[path].cut is None and slices[path].program is not None
        np.testing.assert_array_equal(slices[path].known, 0.0)
    assert all(s.stacked == () for s in slices.values())
    want = reference(Net)
    chex.assert_trees_all_equal({p: replay(s) for p, s in slices.items()}, want)
    # The stream's counter after the constructor is known without running anything.
    (count,) = [e for e in traced.rng_entries[0] if e.state_path[-1] == "count"]
    assert int(traced.analysis.slice(count.output).known) == 4


@pytest.mark.parametrize("seed", [1, 7])
def test_a_slice_replays_on_any_root_key(seed):
    _, slices = analyzed(Net)  # traced once, on abstract keys: the seed is not in it
    want = reference(Net, seed=seed)
    for path in ("up/kernel", "down/kernel"):
        chex.assert_trees_all_equal(replay(slices[path], seed), want[path])


class Fallbacks(nnx.Module):
    """Variables no single cut makes, beside one that is cut."""

    def __init__(self, x, *, rngs):
        self.cut = nnx.Param(jax.random.normal(rngs.params(), (3,)))
        self.root = nnx.Param(jax.random.normal(rngs.params.key[...], (3,)))
        k1, k2 = rngs.params(), rngs.params()
        self.two_keys = nnx.Param(jax.random.normal(k1, (3,)) + jax.random.uniform(k2, (3,)))
        self.input = nnx.Param(jnp.asarray(x) * 2.0)
        self.key_and_input = nnx.Param(jax.random.normal(rngs.params(), (3,)) * x)
        effect = io_callback(lambda: np.full(3, 0.5, np.float32),
                             jax.ShapeDtypeStruct((3,), jnp.float32))
        self.effect = nnx.Param(effect * 2.0)


X = jnp.array([1.0, -2.0, 3.0])
FALLBACK = ["root", "two_keys", "input", "key_and_input", "effect"]


@pytest.fixture(scope="module")
def fallbacks():
    return analyzed(Fallbacks, X)


@pytest.mark.parametrize("path", FALLBACK)
def test_what_no_single_cut_makes_is_left_to_the_fallback(fallbacks, path):
    _, slices = fallbacks
    assert slices[path] == slicing.Slice(None, None)
    assert slices[path].stacked == ()
    assert slices["cut"].cut == slicing.Cut(root=0, count=0)  # its neighbour is still cut


def test_pruned_computes_exactly_the_requested_outputs(fallbacks):
    traced, _ = fallbacks
    closed, index = traced.analysis.closed, outputs(traced)
    want = reference(Fallbacks, X)
    root = jax.random.key(0)
    for paths in (FALLBACK, ["input", "cut"], ["cut", "input"]):
        pruned = traced.analysis.pruned([index[p] for p in paths])
        assert pruned.jaxpr.invars == closed.jaxpr.invars  # called as the whole trace is
        assert len(pruned.jaxpr.outvars) == len(paths)
        got = jax.jit(lambda *a, j=pruned: jax.core.eval_jaxpr(j.jaxpr, j.consts, *a))(
            root, X)
        chex.assert_trees_all_equal(dict(zip(paths, got, strict=True)),
                                    {p: want[p] for p in paths})


def test_a_value_of_an_enclosing_trace_is_left_to_the_fallback():
    rngs = nnx.Rngs(0)
    found = {}

    def outer(x):
        def make(*, rngs):
            layer = nnx.Linear(2, 2, rngs=rngs)
            layer.extra = nnx.Param(x * 2.0)  # x is a tracer of the jit around the trace
            return layer

        traced = nnx_api.traced(make, (), {"rngs": rngs}, fn="test")
        found.update({p: traced.analysis.slice(i) for p, i in outputs(traced).items()})
        return x

    jax.jit(outer)(jnp.ones(2))
    assert found["extra"] == slicing.Slice(None, None)
    assert found["kernel"].cut == slicing.Cut(root=0, count=0)
    assert not programs.leaked_tracers(found["kernel"].program)


class Counted(nnx.Module):
    """Keys folded by counts computed inside the constructor from constants."""

    def __init__(self, size, table, *, rngs):
        root = rngs.params.key[...]
        count = jnp.zeros((), jnp.uint32)
        for _ in range(100):
            count = count + 1
        self.hundred = nnx.Param(jax.random.normal(jax.random.fold_in(root, count), (3,)))
        if table == "computed":  # equations on constants
            counts = jnp.arange(size, dtype=jnp.uint32) * 3
        else:  # a captured array: a constant of the jaxpr
            counts = jnp.asarray(np.arange(size, dtype=np.uint32) * 3)
        self.indexed = nnx.Param(jax.random.normal(jax.random.fold_in(root, counts[7]), (3,)))


@pytest.mark.parametrize("table", ["computed", "captured"])
@pytest.mark.parametrize("size", [N, N + 1])
def test_counts_from_constants_are_folded_up_to_fold_elements(size, table):
    traced, slices = analyzed(Counted, size, table)
    if table == "captured":
        assert [np.size(c) for c in traced.analysis.closed.consts].count(size) == 1
    assert slices["hundred"].cut == slicing.Cut(root=0, count=100)
    if size <= N:
        assert slices["indexed"].cut == slicing.Cut(root=0, count=21)
    else:  # the table is too large to evaluate: its 7th element is not a known count
        assert slices["indexed"] == slicing.Slice(None, None)
    want = reference(Counted, size, table)
    for path, s in slices.items():
        if s.program is not None:
            chex.assert_trees_all_equal(replay(s), want[path])


class Constants(nnx.Module):
    def __init__(self, *, rngs):
        del rngs
        self.at = nnx.Variable(jnp.arange(float(N)))
        self.over = nnx.Variable(jnp.arange(float(N + 1)))
        self.square = nnx.Variable(jnp.full((8, N // 8), 2.0) * 3.0)
        self.scalar = nnx.Variable(jnp.float32(3.0))


def test_small_constant_values_are_known_up_to_fold_elements():
    _, slices = analyzed(Constants)
    np.testing.assert_array_equal(slices["at"].known, np.arange(float(N)))
    np.testing.assert_array_equal(slices["square"].known, np.full((8, N // 8), 6.0))
    np.testing.assert_array_equal(slices["scalar"].known, 3.0)
    assert slices["over"].known is None  # one element too many to evaluate here
    want = reference(Constants)
    for path, s in slices.items():  # all keyless programs, each its own value
        assert s.cut is None and s.program is not None
        chex.assert_trees_all_equal(replay(s), want[path])


class CostlyConstant(nnx.Module):
    """A scalar computed from constants alone by a jit of a large draw: a small output
    of large work."""

    def __init__(self, *, rngs):
        total = jax.jit(lambda: jax.random.normal(jax.random.key(1), (256, 256)).sum())()
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 4)) * total)


def test_only_small_work_is_done_at_trace_time(monkeypatch):
    """Folding evaluates what is small throughout, never a large computation whose
    result happens to be small: the costly scalar is left to the replayed program."""
    evaluated = []
    original = programs.eval_constants

    def spy(closed):
        evaluated.append(closed)
        return original(closed)

    monkeypatch.setattr(programs, "eval_constants", spy)
    _, slices = analyzed(CostlyConstant)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
            for inner in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(inner)

    assert all(size <= N for closed in evaluated for size in sizes(closed.jaxpr))
    s = slices["kernel"]
    assert s.cut == slicing.Cut(root=0, count=0)  # still cut: the total is in its program
    chex.assert_trees_all_equal(replay(s), reference(CostlyConstant)["kernel"])


class Deep(nnx.Module):
    def __init__(self, depth, *, rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(depth)])


def test_equal_layers_share_one_program_so_compiles_stay_flat_in_depth():
    keys, plans = set(), {}
    for depth in (2, 6):
        traced, slices = analyzed(Deep, depth)
        kernels = [slices[f"layers/{i}/kernel"] for i in range(depth)]
        assert [s.cut.count for s in kernels] == list(range(0, 2 * depth, 2))
        keys.update(s.program.key for s in kernels)
        assert len({hash(s.program.key) for s in kernels}) == 1
        plans[depth] = traced, plan_lib.build(traced)
    assert len(keys) == 1 and None not in keys  # one program for every layer, any depth
    cold = {depth: compiled.cold_compiles(plan, list(range(len(plan.leaves))))
            for depth, (_, plan) in plans.items()}
    assert cold[2] == cold[6]
    traced, plan = plans[2]
    engine.execute(plan, traced.call.keys(), [])
    traced, plan = plans[6]
    with count_compiles() as c:
        got = engine.execute(plan, traced.call.keys(), [])
    assert c.count == 0  # 6 layers reuse what 2 layers compiled
    want = reference(Deep, 6)
    got = traverse_util.flatten_dict(got["params"], sep="/")
    chex.assert_trees_all_equal(got, {p: v for p, v in want.items() if p in got})
    assert len(got) == 12


class Different(nnx.Module):
    """Layers of one shape computing different things, and one of another shape."""

    def __init__(self, *, rngs):
        self.a = nnx.Linear(4, 4, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.b = nnx.Linear(4, 4, kernel_init=nnx.initializers.normal(0.03), rngs=rngs)
        self.c = nnx.Linear(4, 4, kernel_init=nnx.initializers.uniform(0.02), rngs=rngs)
        self.d = nnx.Linear(4, 5, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.e = nnx.Linear(4, 4, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def test_slices_that_compute_different_things_never_share_a_program():
    _, slices = analyzed(Different)
    key = {name: slices[f"{name}/kernel"].program.key for name in "abcde"}
    assert key["a"] == key["e"]
    assert len({key[name] for name in "abcd"}) == 4
    want = reference(Different)
    for name in "abcde":
        chex.assert_trees_all_equal(replay(slices[f"{name}/kernel"]), want[f"{name}/kernel"])


class Captured(nnx.Module):
    """Equal computations adding different large captured arrays (passed at run time)."""

    def __init__(self, *, rngs):
        table = np.arange(2000, dtype=np.float32)
        self.a = nnx.Param(jax.random.normal(rngs.params(), (2000,)) + table)
        self.b = nnx.Param(jax.random.normal(rngs.params(), (2000,)) + table[::-1])


def test_a_shared_program_replays_each_slices_own_large_constant():
    _, slices = analyzed(Captured)
    a, b = slices["a"].program, slices["b"].program
    assert a.key == b.key  # large constants are keyed by shape and dtype only
    assert a.baked == b.baked == (False,)
    assert not np.array_equal(a.runtime_consts[0], b.runtime_consts[0])
    want = reference(Captured)
    chex.assert_trees_all_equal({p: replay(slices[p]) for p in "ab"},
                                {p: want[p] for p in "ab"})


def test_a_split_key_stack_is_cut_once_and_drawn_per_layer():
    _, slices = analyzed(Stacked, 3, 4)
    kernel = slices["layers/linear/kernel"]
    assert kernel.cut == slicing.Cut(root=0, count=0)
    assert kernel.stacked == (3,)
    assert slices["head/kernel"].stacked == () and slices["head/kernel"].cut.count == 1
    chex.assert_shape(replay(kernel), (3, 4, 4))
    want = reference(Stacked, 3, 4)
    for path in ("layers/linear/kernel", "head/kernel"):
        chex.assert_trees_all_equal(replay(slices[path]), want[path])


INITS = {
    "lecun_normal": nnx.initializers.lecun_normal(),
    "normal": nnx.initializers.normal(0.02),
    "uniform": nnx.initializers.uniform(1.0),
    "ones": nnx.initializers.ones,
}


class MLP(nnx.Module):
    def __init__(self, widths, init, *, rngs):
        self.layers = nnx.List([
            nnx.Linear(i, o, kernel_init=INITS[init], rngs=rngs)
            for i, o in zip(widths[:-1], widths[1:], strict=True)
        ])


@settings(max_examples=8, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       init=st.sampled_from(sorted(INITS)), seed=st.integers(0, 2**31 - 1))
def test_every_layer_of_any_mlp_replays_alone_bit_for_bit(widths, init, seed):
    widths = tuple(widths)
    _, slices = analyzed(MLP, widths, init)
    want = reference(MLP, widths, init, seed=seed)
    assert sorted(slices) == sorted(want)
    for i in range(len(widths) - 1):
        kernel = slices[f"layers/{i}/kernel"]
        # A kernel drawn from its key is cut at it; ``ones`` ignores its key: keyless.
        assert kernel.cut == (None if init == "ones" else slicing.Cut(root=0, count=2 * i))
        assert slices[f"layers/{i}/bias"].cut is None
    chex.assert_trees_all_equal({p: replay(s, seed) for p, s in slices.items()}, want)
