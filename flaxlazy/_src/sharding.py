"""Shardings for a variables tree: path-keyed partition rules and Flax partitioning metadata.

Each leaf's ``PartitionSpec`` is chosen in this order (the first that applies wins):

1. a 0-d leaf (a scalar, such as NNX RNG state: ``RngKey/...``, ``RngCount/...``) is
   replicated, ``PartitionSpec()``. A rule that a scalar matches is still checked: one
   naming a mesh axis the mesh lacks, or one that only scalars take (so written for
   them) with a spec a scalar cannot have (``PartitionSpec('model')``), is an error; a
   broad rule that also shards arrays (``("**", PartitionSpec("data"))``) leaves
   scalars replicated;
2. the first partition rule whose pattern matches the leaf's path (below) and whose
   value is a ``PartitionSpec``. A rule whose value is ``None`` means "keep the Flax
   annotation": it stops the search for an annotated leaf and is skipped for a leaf
   without one;
3. the leaf's Flax annotation, exactly as Flax reads it (``nn.get_partition_spec``):
   ``nn.Partitioned`` (``nn.with_partitioning``) names are mesh axes;
   ``nn.LogicallyPartitioned`` (``nn.with_logical_partitioning``) names are logical
   axes, mapped to mesh axes by ``logical_axis_rules`` as ``nn.logical_to_mesh_axes``
   does (one difference: a logical name no rule mentions is an error, not silently
   replicated; map it to ``None`` to replicate). ``nn.scan``-stacked parameters carry
   the name given by ``metadata_params={nn.PARTITION_NAME: "layers"}`` on their extra
   axis, mapped like any other;
4. otherwise the leaf is *uncovered*. By default (``require_rules=None``) an uncovered
   leaf is an error when ``partition_rules`` are given (so a forgotten rule never
   silently replicates a large leaf), and replicated, as Flax does, when they are not
   (an annotated model needs no rules). ``require_rules=True`` makes uncovered leaves an
   error always, ``require_rules=False`` replicates them always. ``summary(..., mesh=)``
   marks leaves replicated this way.

So explicit rules override annotations. A catch-all ``("**", PartitionSpec())`` last
replicates everything else, annotated leaves included; to keep annotations and
replicate only the unannotated rest, end with ``("**", None), ("**", PartitionSpec())``.
Whatever chose a spec, it is checked against the leaf's shape and the mesh.

Rule paths. Rules are an ordered list (or mapping) of ``(pattern, PartitionSpec)`` with
the same patterns as ``initializers=`` (``flaxlazy._src.rules``: globs with ``*`` within
a segment and ``**`` across segments, or compiled regexes; the whole path must match;
the first match wins). A parameter is matched by its path inside ``params``
(``"Dense_0/kernel"``, as ``initializers=`` sees it) or, for a glob starting with
``params/``, by its full path as ``summary`` prints it (``"params/Dense_0/kernel"``); a
regex may match either. A leaf of any other collection is matched by its path including
the collection (``"batch_stats/BatchNorm_0/mean"``), so ``"**"`` matches everything,
``"**/kernel"`` matches kernels in every collection and ``"batch_stats/**"`` one whole
collection. A tree without a collection level (e.g. ``variables["params"]``) is matched
by its paths as they are. Results are keyed by the full, collection-qualified path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AbstractMesh
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import nnx_variables as nnx_state
from flaxlazy._src import paths
from flaxlazy._src import rules as rules_lib
from flaxlazy._src import warn
from flaxlazy._src.sharding_checks import WHAT
from flaxlazy._src.sharding_checks import _check_rule_values
from flaxlazy._src.sharding_checks import check_logical_axis_rules
from flaxlazy._src.sharding_checks import check_mesh
from flaxlazy._src.sharding_checks import check_spec

PARAMS = paths.PARAMS
_MAX_LISTED = 10

# How a leaf's spec was chosen (``Choice.kind``).
SCALAR = "scalar"
RULE = "rule"
ANNOTATION = "annotation"
DEFAULT = "default"  # uncovered, replicated because rules are not required
FAILED = "failed"  # only with choose(problems=[...]): would be an error; replicated here

# Kinds of the problems choose(problems=[...]) collects instead of raising.
PROBLEM_UNCOVERED = "uncovered"
PROBLEM_BAD_SPEC = "bad_spec"

UNPARTITIONED = (
    "`{what}`: no partition rule matches {listing} and {it} carr{ies} no Flax partitioning "
    "annotation. Add a rule for {them} (patterns match the path inside 'params', e.g. "
    "'Dense_0/kernel', or the full path as summary prints it, 'params/Dense_0/kernel'; "
    "other collections by their full path, e.g. 'batch_stats/**'), put a catch-all "
    "('**', PartitionSpec()) last to replicate everything else, or pass "
    "`require_rules=False` to replicate every leaf no rule or annotation covers."
)
KEEP_ANNOTATIONS_HINT = (
    " Rules override Flax annotations, so to keep the annotated leaves' own specs and "
    "replicate only the rest, end with [..., ('**', None), ('**', PartitionSpec())]."
)


class Choice(NamedTuple):
    """One leaf's ``PartitionSpec`` and what chose it.

    Attributes:
      spec: the ``PartitionSpec``.
      source: what chose it, in words (for messages).
      kind: ``"scalar"``, ``"rule"``, ``"annotation"`` or ``"default"`` (no rule and no
        annotation covers the leaf, and it was replicated).
    """

    spec: PartitionSpec
    source: str
    kind: str


def strict(require_rules: bool | None, partition_rules: Any) -> bool:
    """Whether uncovered leaves are an error (see the module docstring).

    Args:
      require_rules: the user's ``require_rules`` (None, True or False).
      partition_rules: the user's ``partition_rules`` (None when not given).

    Raises:
      TypeError: for a ``require_rules`` that is not None or a bool.
    """
    if require_rules is None:
        return partition_rules is not None
    if not isinstance(require_rules, bool):
        raise TypeError(
            f"`require_rules` must be None (required exactly when `partition_rules` are "
            f"given), True or False; got {require_rules!r}."
        )
    return require_rules


def rule_path(path: str) -> str:
    """The path errors show for a leaf: inside ``params`` without the collection.

    Examples:
      >>> rule_path("params/Block_0/Dense_1/kernel")
      'Block_0/Dense_1/kernel'
      >>> rule_path("batch_stats/BatchNorm_0/mean")
      'batch_stats/BatchNorm_0/mean'
    """
    return paths.split_params(path)[0]


def _array(leaf: Any) -> Any:
    """The abstract or concrete array in a leaf, without applying Flax constraints."""
    if isinstance(leaf, meta.Partitioned):
        return leaf.value  # ``unbox()`` would add a sharding constraint under a mesh
    return leaf.unbox() if paths.is_box(leaf) else leaf


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    x = _array(leaf)
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    dtype = getattr(x, "dtype", None)
    return tuple(shape), np.asarray(x).dtype if dtype is None else dtype


def _logical_spec(path: str, box: Any, logical_axis_rules: Any) -> PartitionSpec:
    rules = logical_axis_rules
    if rules is None:
        rules = box.rules if box.rules is not None else nn.get_logical_axis_rules()
        rules = check_logical_axis_rules(rules)
    known = {name for name, _ in rules}
    missing = [n for n in box.names if isinstance(n, str) and n not in known]
    if missing:
        raise ValueError(
            f"{path!r} is annotated with logical axes {tuple(box.names)} "
            f"(nn.LogicallyPartitioned), but `logical_axis_rules` has no rule for "
            f"{', '.join(map(repr, missing))}. Pass logical_axis_rules=[(logical_name, "
            "mesh_axis_or_None), ...], e.g. "
            f"[{', '.join(f'({n!r}, None)' for n in missing)}] to replicate "
            f"{'it' if len(missing) == 1 else 'them'}; unlike Flax, unmapped logical axes "
            "are an error rather than silently replicated."
        )
    try:
        return nn.logical_to_mesh_axes(tuple(box.names), list(rules))
    except ValueError as e:  # e.g. a logical name used for two dimensions
        raise ValueError(f"{path!r} (nn.LogicallyPartitioned{tuple(box.names)}): {e}") from None


def _annotation(path: str, leaf: Any, logical_axis_rules: Any) -> tuple[Any, str] | None:
    """(spec, source) from a leaf's Flax box, or None when it has no annotation."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        spec = _logical_spec(path, leaf, logical_axis_rules)
        return spec, f"nn.LogicallyPartitioned{tuple(leaf.names)} via logical_axis_rules"
    if isinstance(leaf, meta.Partitioned):
        return PartitionSpec(*leaf.names), f"nn.Partitioned{tuple(leaf.names)}"
    if paths.is_box(leaf) and hasattr(leaf, "get_partition_spec"):
        return leaf.get_partition_spec(), f"{type(leaf).__name__} annotation"
    spec = carried_spec(leaf)
    if spec is not None and any(axis is not None for axis in spec):
        return spec, f"its own sharding {spec} (out_sharding= or an already sharded leaf)"
    return None


def carried_spec(leaf: Any) -> PartitionSpec | None:
    """The spec of the ``NamedSharding`` a leaf's array already carries (an explicit-mode
    ``out_sharding=``, or a tree ``abstract_init``/``materialize`` placed), else None.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> carried_spec(jax.ShapeDtypeStruct((4,), "float32",
      ...                                   sharding=NamedSharding(mesh, P("model"))))
      P('model',)
      >>> carried_spec(jax.ShapeDtypeStruct((4,), "float32")) is None
      True
    """
    sharding = getattr(_array(leaf), "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else None


def _rule_for(path: str, leaf: Any, rules: Sequence[rules_lib.Rule]) -> rules_lib.Rule | None:
    """The rule that gives a leaf its spec, or None (no rule, or keep the annotation)."""
    short, full = paths.split_params(path)
    for rule in rules:
        if rule.matches(short, full):
            if rule.value is not None:
                return rule
            if paths.is_box(leaf):  # ``None``: keep the annotation, if there is one
                return None
    return None


def _source(rule: rules_lib.Rule) -> str:
    return f"`{WHAT}`: {rule.label}"


def _resolve(
    path: str, leaf: Any, rules: Sequence[rules_lib.Rule], logical_axis_rules: Any
) -> tuple[Choice | None, rules_lib.Rule | None]:
    """The choice for one leaf from rules and annotations (None when nothing covers it),
    and the rule that made it (None for an annotation)."""
    rule = _rule_for(path, leaf, rules)
    if rule is not None:
        return Choice(rule.value, _source(rule), RULE), rule
    # Only now: an overridden annotation is never resolved (nor its logical axes checked).
    found = _annotation(path, leaf, logical_axis_rules)
    return (None if found is None else Choice(*found, ANNOTATION)), None


def _unpartitioned(missing: Sequence[str], annotated: bool) -> str:
    listing = ", ".join(repr(p) for p in missing[:_MAX_LISTED])
    if len(missing) > _MAX_LISTED:
        listing += f" and {len(missing) - _MAX_LISTED} more"
    one = len(missing) == 1
    message = UNPARTITIONED.format(
        what=WHAT, listing=listing, it="it" if one else "they", ies="ies" if one else "y",
        them="it" if one else "them",
    )
    if annotated:
        message += KEEP_ANNOTATIONS_HINT
    return message


# The order in which ``choose`` (so ``materialize``) meets placement problems (``inspect``
# lists them so): partition rules that match no variable, then each variable's placement.
PROBLEM_ORDER = ("unused", "variables")


def choose(
    abstract_tree: Any,
    mesh: Mesh | AbstractMesh,
    *,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
    problems: list[tuple[str, str]] | None = None,
) -> dict[str, Choice]:
    """Every leaf's ``Choice`` (spec and what chose it), validated; see ``partition_specs``.

    With ``problems`` (a list), a leaf's error is appended to it as ``(kind, message)``
    (``PROBLEM_UNCOVERED`` or ``PROBLEM_BAD_SPEC``, with the message ``materialize`` would
    raise) and the leaf gets a replicated ``FAILED`` choice, so that a report can list
    every problem at once.

    Examples:
      >>> import jax, numpy as np, flax.linen as nn, flaxlazy
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> dense = nn.Dense(4, kernel_init=nn.with_partitioning(
      ...     nn.initializers.lecun_normal(), (None, "model")))
      >>> shapes = flaxlazy.abstract_init(dense, jax.random.key(0), flaxlazy.spec("f32[2,3]"))
      >>> {path: c.kind for path, c in choose(shapes, mesh).items()}
      {'params/bias': 'default', 'params/kernel': 'annotation'}
    """
    check_mesh(mesh)
    require = strict(require_rules, partition_rules)
    logical_axis_rules = check_logical_axis_rules(logical_axis_rules)
    flat, _ = paths.flatten(abstract_tree)
    rules = rules_lib.normalize(partition_rules, what=WHAT)
    _check_rule_values(rules)
    rules_lib.assign(
        rules, [p for p, _ in flat], what=f"`{WHAT}`", allow_unused=allow_unused_rules,
        qualified=True,
    )
    out: dict[str, Choice] = {}
    missing = []
    scalars = []  # (path, dtype, rule) of each scalar a rule matches
    shards_arrays = set()  # ids of the rules that give an array (rank >= 1) its spec

    def fail(path: str, kind: str, error: ValueError, spec: PartitionSpec) -> None:
        if problems is None:
            raise error
        problems.append((kind, str(error)))
        out[path] = Choice(spec, "failed", FAILED)

    for path, leaf in flat:
        shape, dtype = _shape_dtype(leaf)
        if not shape:
            out[path] = Choice(PartitionSpec(), "a scalar", SCALAR)
            rule = _rule_for(path, leaf, rules)
            if rule is not None:
                scalars.append((path, dtype, rule))
            continue
        try:
            found, rule = _resolve(path, leaf, rules, logical_axis_rules)
        except ValueError as e:  # a logical axis no rule maps
            fail(path, PROBLEM_UNCOVERED, e, PartitionSpec())
            continue
        if rule is not None:
            shards_arrays.add(id(rule))
        if found is None:
            if require:
                missing.append(rule_path(path))
                out[path] = Choice(PartitionSpec(), "failed", FAILED)
                continue
            found = Choice(PartitionSpec(), "no rule or annotation (replicated)", DEFAULT)
        try:
            check_spec(path, shape, dtype, found.spec, mesh, found.source)
        except ValueError as e:
            fail(path, PROBLEM_BAD_SPEC, e, found.spec)
            continue
        out[path] = found
    for path, dtype, rule in scalars:
        if id(rule) in shards_arrays:  # a broad rule, checked on the arrays it shards
            continue
        try:  # a rule only scalars take was written for them: it must fit a scalar
            check_spec(path, (), dtype, rule.value, mesh, _source(rule))
        except ValueError as e:
            fail(path, PROBLEM_BAD_SPEC, e, PartitionSpec())
    if missing:
        annotated = any(map(paths.is_box, dict(flat).values()))
        fail(missing[0], PROBLEM_UNCOVERED, ValueError(_unpartitioned(missing, annotated)),
             PartitionSpec())
    return out


def partition_specs(
    abstract_tree: Any,
    mesh: Mesh | AbstractMesh,
    *,
    partition_rules: Mapping | Sequence[tuple[Any, PartitionSpec]] | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
) -> dict[str, PartitionSpec]:
    """The ``PartitionSpec`` of every leaf, from rules and Flax annotations, validated.

    See the module docstring for the order of precedence and how rule paths are written.

    Args:
      abstract_tree: a variables tree (``abstract_init``'s result, or concrete arrays),
        with Flax boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) kept.
      mesh: the ``jax.sharding.Mesh`` (or ``AbstractMesh``) the specs refer to.
      partition_rules: ``[(pattern, PartitionSpec)]`` or ``{pattern: PartitionSpec}``
        (globs or compiled regexes, first match wins), or a nested dict mirroring the
        tree, or None.
      logical_axis_rules: ``[(logical_name, mesh_axes)]`` as in ``nn.logical_axis_rules``
        (``mesh_axes`` a name, a tuple of names or None; earlier rules have priority;
        a mapping also works), used for ``nn.LogicallyPartitioned`` leaves. Default: the
        box's own rules, else the rules set with ``nn.logical_axis_rules(...)``.
      allow_unused_rules: accept rules that match no leaf (shared rule sets).
      require_rules: whether every leaf (but scalars) must be covered by a rule or a
        Flax annotation. None (default): required exactly when ``partition_rules`` is
        given; otherwise uncovered leaves are replicated, as Flax does. True: always
        required. False: uncovered leaves are replicated even with rules.

    Returns:
      ``{collection-qualified path: PartitionSpec}`` in tree order.

    Raises:
      ValueError: an uncovered leaf when rules are required, a rule matching nothing, a
        logical axis with no logical rule, or a spec that does not fit the leaf or the
        mesh (naming path, shape, spec and mesh axis sizes).
      TypeError: a mesh that is not a mesh, a rule value that is not a
        ``PartitionSpec``, or malformed ``logical_axis_rules``.

    Examples:
      >>> import jax, numpy as np, flax.linen as nn, flaxlazy
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
      >>> shapes = flaxlazy.abstract_init(nn.Dense(4), jax.random.key(0), flaxlazy.spec("f32[2,3]"))
      >>> partition_specs(shapes, mesh, partition_rules=[
      ...     ("**/kernel", P(None, "model")), ("**", P())])
      {'params/bias': P(), 'params/kernel': P(None, 'model')}
    """
    chosen = choose(
        abstract_tree, mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
        require_rules=require_rules,
    )
    return {path: c.spec for path, c in chosen.items()}


def shardings(
    abstract_tree: Any,
    mesh: Mesh | AbstractMesh,
    *positional_rules: Any,
    partition_rules: Mapping | Sequence[tuple[Any, PartitionSpec]] | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
) -> Any:
    """The tree of ``NamedSharding``s for a variables tree (what ``materialize`` uses).

    The result has the structure of ``abstract_tree`` with each leaf (and each Flax box)
    replaced by its ``jax.sharding.NamedSharding``, ready for
    ``jax.jit(..., in_shardings=..., out_shardings=...)`` on the unboxed variables
    (``nn.meta.unbox``) or for checkpoint restore. Specs are chosen and validated as in
    ``partition_specs``. For an annotated model and no ``partition_rules`` this is what
    ``nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)`` gives.

    Args:
      abstract_tree: a variables tree, abstract or concrete, Flax boxes kept; or an NNX
        module or ``nnx.State`` (the result is then an ``nnx.State`` of shardings, for
        ``nnx.jit``'s ``in_shardings``/``out_shardings`` or ``nnx.update``).
      mesh: the ``jax.sharding.Mesh`` (an ``AbstractMesh`` works too).
      *positional_rules: deprecated: ``partition_rules`` and ``logical_axis_rules``
        passed by position (a ``DeprecationWarning``); pass them by keyword, as every
        other flaxlazy function takes its options.
      partition_rules: as in ``partition_specs``.
      logical_axis_rules: as in ``partition_specs``.
      allow_unused_rules: as in ``partition_specs``.
      require_rules: as in ``partition_specs``.

    Returns:
      The tree of ``NamedSharding``s.

    Raises:
      ValueError, TypeError: as ``partition_specs``; a rule given both by position and
        by keyword, or more than two positional rules.

    Examples:
      >>> import jax, numpy as np, flax.linen as nn, flaxlazy
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> dense = nn.Dense(4, kernel_init=nn.with_partitioning(
      ...     nn.initializers.lecun_normal(), (None, "model")))
      >>> shapes = flaxlazy.abstract_init(dense, jax.random.key(0), flaxlazy.spec("f32[2,3]"))
      >>> tree = shardings(shapes, mesh)
      >>> tree["params"]["kernel"].spec, tree["params"]["bias"].spec
      (P(None, 'model'), P())
    """
    if positional_rules:
        partition_rules, logical_axis_rules = _by_keyword(
            positional_rules, partition_rules, logical_axis_rules)
    if nnx_state.is_nnx(abstract_tree):  # an nnx.State of shardings, like nnx.state(model)
        tree = nnx_state.as_variables(abstract_tree)
        found = dict(paths.flatten(shardings(
            tree, mesh, partition_rules=partition_rules,
            logical_axis_rules=logical_axis_rules,
            allow_unused_rules=allow_unused_rules, require_rules=require_rules,
        ))[0])
        return nnx_state.like_state(abstract_tree, found)
    flat, treedef = paths.flatten(abstract_tree)
    specs = partition_specs(
        abstract_tree, mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
        require_rules=require_rules,
    )
    return jax.tree_util.tree_unflatten(
        treedef, [NamedSharding(mesh, specs[path]) for path, _ in flat]
    )


_NAMES = ("partition_rules", "logical_axis_rules")


def _by_keyword(positional: tuple, partition_rules: Any, logical_axis_rules: Any
                ) -> tuple[Any, Any]:
    """``shardings``' rules given by position, as keywords, with a deprecation warning."""
    if len(positional) > len(_NAMES):
        raise TypeError(
            f"shardings: takes the tree and the mesh by position and the rest by keyword; "
            f"got {2 + len(positional)} positional arguments. Pass "
            f"partition_rules=... and logical_axis_rules=... by keyword.")
    given = dict(zip(_NAMES, positional, strict=False))
    keywords = {"partition_rules": partition_rules, "logical_axis_rules": logical_axis_rules}
    for name in given:
        if keywords[name] is not None:
            raise TypeError(f"shardings: `{name}` given both by position and by keyword.")
    names = ", ".join(f"{n}=..." for n in given)
    warnings.warn(
        f"shardings: rules passed by position are deprecated; pass {names} by keyword, as "
        f"every other flaxlazy function takes its options.", DeprecationWarning,
        stacklevel=warn.user_stacklevel())
    keywords.update(given)
    return keywords["partition_rules"], keywords["logical_axis_rules"]


def with_shardings(
    abstract_tree: Any,
    mesh: Mesh | AbstractMesh,
    *,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
) -> Any:
    """``abstract_tree`` with each ``ShapeDtypeStruct`` carrying its ``NamedSharding``.

    Flax boxes are kept around the sharded ``ShapeDtypeStruct``s. Arguments as in
    ``partition_specs``.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}
      >>> out = with_shardings(tree, mesh, partition_rules=[("w", P("model"))])
      >>> out["params"]["w"].sharding.spec
      P('model',)
    """
    specs = partition_specs(
        abstract_tree, mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
        require_rules=require_rules,
    )
    return placed(abstract_tree, {path: NamedSharding(mesh, spec) for path, spec in specs.items()})


def placed(abstract_tree: Any, by_path: Mapping[str, Any]) -> Any:
    """``abstract_tree`` with each leaf a ``ShapeDtypeStruct`` carrying its sharding,
    ``by_path[path]`` (Flax boxes kept around them).

    Examples:
      >>> import jax
      >>> tree = {"params": {"w": jax.numpy.zeros((4, 2))}}
      >>> one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      >>> placed(tree, {"params/w": one})["params"]["w"].sharding == one
      True
    """
    flat, treedef = paths.flatten(abstract_tree)
    out = []
    for path, leaf in flat:
        shape, dtype = _shape_dtype(leaf)
        sds = jax.ShapeDtypeStruct(shape, dtype, sharding=by_path[path])
        out.append(leaf.replace_boxed(sds) if paths.is_box(leaf) else sds)
    return jax.tree_util.tree_unflatten(treedef, out)
