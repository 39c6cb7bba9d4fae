"""Where each leaf goes: one device, a tree of shardings, or a mesh with partition rules."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple
from typing import TypeVar

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import _compat
from flaxlazy._src import paths
from flaxlazy._src import rules as rules_lib
from flaxlazy._src import sharding as sharding_lib

T = TypeVar("T")


NEEDS_MESH = (
    "{prefix}{names} need a `mesh=`; got no mesh, so they would be ignored."
)
ONE_WAY = "{prefix}{verb} only one of {names}; got {given}."
_WAYS = ("device", "shardings", "mesh")
_NEED_MESH = ("partition_rules", "logical_axis_rules", "require_rules")


def _names(names: Any) -> str:
    """```a` and `b``` / ```a`, `b` and `c```: argument names in a message."""
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


class Placement(NamedTuple):
    """Where a public call places each leaf: its seven placement arguments, checked once.

    Built by ``Placement.from_args`` at the top of each public function, then passed
    down whole instead of the seven arguments. ``mesh`` is the mesh the leaves go to:
    the one given, or, when no ``device``, ``shardings`` or ``mesh`` is given and the
    call asks for it (``ambient=True``), the mesh of a ``jax.set_mesh`` around the call.

    Attributes:
      fn: the public function, named in errors (``"materialize"``).
      device: a ``jax.sharding.Sharding`` for every leaf (a ``jax.Device`` given is
        turned into its ``SingleDeviceSharding``), or None.
      shardings: a ``Sharding`` or a pytree prefix of them, or None.
      mesh: the resolved ``Mesh`` (given or ambient), or None.
      given_mesh: the ``mesh`` argument as given (None inside ``jax.set_mesh`` alone).
      partition_rules: the rules as ``rules.normalize`` gives them (a list of ``Rule``s
        in priority order, normalized once for every stage), or None when not given.
      logical_axis_rules, allow_unused_rules, require_rules: as given; see
        ``flaxlazy.materialize``.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> Placement.from_args(fn="materialize", mesh=mesh).mesh is mesh
      True
      >>> Placement.from_args(fn="materialize", partition_rules=[])
      Traceback (most recent call last):
      ...
      TypeError: materialize: `partition_rules` need a `mesh=`; got no mesh, so they
      would be ignored.
    """

    fn: str | None = None
    device: Any = None
    shardings: Any = None
    mesh: Any = None
    given_mesh: Any = None
    partition_rules: Any = None
    logical_axis_rules: Any = None
    allow_unused_rules: bool = False
    require_rules: bool | None = None

    @classmethod
    def from_args(
        cls,
        *,
        fn: str | None,
        device: Any = None,
        shardings: Any = None,
        mesh: Any = None,
        partition_rules: Any = None,
        logical_axis_rules: Any = None,
        allow_unused_rules: bool = False,
        require_rules: bool | None = None,
        ambient: bool = True,
        ways: tuple[str, ...] = _WAYS,
    ) -> Placement:
        """The checked ``Placement`` of a call's placement arguments.

        Args:
          fn: the public function, for errors (None: messages without a prefix).
          device, shardings, mesh, partition_rules, logical_axis_rules,
            allow_unused_rules, require_rules: the call's arguments.
          ambient: whether the mesh of a ``jax.set_mesh`` around the call stands in for
            ``mesh`` when no way of placing is given.
          ways: the ways of placing the function accepts, named when several are given.

        Returns:
          The ``Placement``.

        Raises:
          TypeError: more than one of ``device``, ``shardings`` and ``mesh``; rules
            without a mesh (they would be ignored); a ``device`` that is no
            ``jax.Device`` or ``Sharding``; ``partition_rules`` in no accepted form.
          ValueError: a malformed glob in ``partition_rules``.
        """
        prefix = f"{fn}: " if fn else ""
        given = [n for n, v in (("device", device), ("shardings", shardings), ("mesh", mesh))
                 if v is not None]
        if len(given) > 1:
            raise TypeError(ONE_WAY.format(
                prefix=prefix, verb="pass" if fn else "Pass", names=_names(ways),
                given=given))
        resolved = mesh
        if not given and ambient:
            resolved = ambient_mesh()  # inside jax.set_mesh: placed there, as nnx.jit would
        if resolved is None:
            needs = [n for n, v in zip(_NEED_MESH, (partition_rules, logical_axis_rules,
                                                    require_rules), strict=True)
                     if v is not None]
            if needs:
                raise TypeError(NEEDS_MESH.format(prefix=prefix, names=_names(needs)))
        if device is not None:
            if isinstance(device, jax.Device):
                device = jax.sharding.SingleDeviceSharding(device)
            if not isinstance(device, jax.sharding.Sharding):
                raise TypeError(
                    f"`device` must be a jax.Device (e.g. jax.devices('cpu')[0]) or a "
                    f"jax.sharding.Sharding, got {device!r}."
                )
        if partition_rules is not None:  # normalized once, here, for every stage
            partition_rules = rules_lib.normalize(partition_rules, what=sharding_lib.WHAT)
        return cls(fn, device, shardings, resolved, mesh, partition_rules,
                   logical_axis_rules, allow_unused_rules, require_rules)

    def rules(self) -> dict[str, Any]:
        """The rule arguments, as keywords for ``sharding`` functions."""
        return dict(partition_rules=self.partition_rules,
                    logical_axis_rules=self.logical_axis_rules,
                    allow_unused_rules=self.allow_unused_rules,
                    require_rules=self.require_rules)

    def by_path(self, abstract_tree: Any) -> dict[str, Any] | None:
        """``{collection-qualified path: Sharding or None}``, or None for JAX's default
        device (see ``resolve``)."""
        if self.device is not None:
            return broadcast(self.device, abstract_tree)
        if self.shardings is not None:
            return broadcast(self.shardings, abstract_tree)
        if self.mesh is not None:
            sharding_lib.check_mesh(self.mesh, concrete=True)
            specs = sharding_lib.partition_specs(abstract_tree, self.mesh, **self.rules())
            return {path: NamedSharding(self.mesh, spec) for path, spec in specs.items()}
        return None

    def for_plan(self, abstract_tree: Any) -> Callable[[str, Any], Any] | None:
        """``by_path`` as the ``shardings`` function ``plan.build`` takes, or None."""
        by_path = self.by_path(abstract_tree)
        return None if by_path is None else (lambda path, leaf: by_path[path])


def resolve(
    abstract_tree: Any,
    *,
    device: Any = None,
    shardings: Any = None,
    mesh: Any = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
) -> dict[str, Any] | None:
    """``{collection-qualified path: Sharding or None}``, or None for JAX's default device.

    Exactly one way of placing may be given: ``device`` (a ``jax.Device`` or one
    ``Sharding`` for every leaf), ``shardings`` (a ``Sharding`` or a pytree prefix of
    them), or ``mesh`` (a ``jax.sharding.Mesh`` of real devices, with
    ``partition_rules`` and/or the Flax annotations; see ``flaxlazy.shardings`` for
    ``require_rules``). With none of them, inside ``jax.set_mesh`` the ambient mesh is
    the ``mesh`` (as ``nnx.jit(ctor)`` and ``jax.jit(module.init)`` place there).
    ``Placement.from_args(...).by_path(abstract_tree)``, without a function name.

    Raises:
      TypeError: for conflicting or malformed placement arguments, naming them.
      ValueError: from the rules and annotations (see ``flaxlazy.shardings``).

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> resolve(tree, mesh=mesh)["params/w"].spec
      P()
      >>> resolve(tree, mesh=mesh.abstract_mesh)
      Traceback (most recent call last):
      ...
      TypeError: `mesh` must be a jax.sharding.Mesh, got AbstractMesh ...
    """
    return Placement.from_args(
        fn=None, device=device, shardings=shardings, mesh=mesh,
        partition_rules=partition_rules, logical_axis_rules=logical_axis_rules,
        allow_unused_rules=allow_unused_rules, require_rules=require_rules,
    ).by_path(abstract_tree)


def ambient_mesh() -> Any:
    """The concrete mesh of a ``jax.set_mesh`` around this call, or None."""
    mesh = _compat.concrete_mesh()
    return None if mesh is None or mesh.empty else mesh


def trace_for(mesh: Any, trace: Callable[[], T]) -> T:
    """``trace()``, run where a model placed on ``mesh`` is traced.

    Values never depend on the mesh: a model is traced as it is, without ``mesh``, so its
    values equal the framework's own init without one, on any mesh. (Under a mesh of
    Explicit axes JAX constrains every intermediate value's sharding, which changes how
    XLA folds constants: ``normal(0.02)`` moves by an ULP in a quarter of its elements on
    2 devices and not on 1.) Only a model that cannot be traced without the mesh, one
    that names its axes (``out_sharding=P(...)``, ``reshard``), is traced again inside
    ``jax.set_mesh(mesh)``, as ``nnx.jit`` would trace it there (an ``AbstractMesh``
    under JAX's abstract-mesh context: shapes only). Inside a ``jax.set_mesh``
    already, the model is traced there, as the user's own ``nnx.jit`` would be.
    """
    if mesh is None or ambient_mesh() is not None:
        return trace()
    try:
        return trace()
    except Exception as e:  # noqa: BLE001 - retried only if the error names a mesh
        if "mesh" not in str(e).lower():
            raise
    with _under(mesh):
        return trace()


def _under(mesh: Any) -> Any:
    """The context a model is traced in on ``mesh``: ``jax.set_mesh`` for a ``Mesh``, JAX's
    abstract-mesh context for an ``AbstractMesh`` (``inspect`` traces on one)."""
    if isinstance(mesh, jax.sharding.Mesh):
        return jax.set_mesh(mesh)
    return jax.sharding.use_abstract_mesh(mesh)


def broadcast(shardings_tree: Any, abstract_tree: Any) -> dict[str, Any]:
    """Spreads one sharding, or a pytree prefix of shardings, over every leaf.

    For ``materialize(..., shardings=...)``: a single ``Sharding`` applies to every leaf;
    a tree applies each of its leaves to the whole subtree below it (``None`` leaves a
    subtree on JAX's default device). 0-d leaves under a ``NamedSharding`` are
    replicated over its mesh. Each ``NamedSharding`` is validated like a rule.

    Args:
      shardings_tree: a ``jax.sharding.Sharding`` or a pytree prefix of them.
      abstract_tree: the variables tree (Flax boxes count as leaves).

    Returns:
      ``{collection-qualified path: Sharding or None}`` in tree order.

    Raises:
      ValueError: a tree that is not a prefix of the variables tree, or a sharding that
        does not fit its leaf.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}
      >>> broadcast({"params": NamedSharding(mesh, P("model"))}, tree)["params/w"].spec
      P('model',)
    """
    flat, treedef = paths.flatten(abstract_tree)
    if shardings_tree is None or isinstance(shardings_tree, jax.sharding.Sharding):
        given = [shardings_tree] * len(flat)
    else:
        try:
            given = treedef.flatten_up_to(
                jax.tree.broadcast(
                    shardings_tree, jax.tree_util.tree_unflatten(treedef, [0] * len(flat)),
                    is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding),
                )
            )
        except (ValueError, TypeError) as e:
            top = sorted(abstract_tree) if isinstance(abstract_tree, Mapping) else "?"
            raise ValueError(
                "`shardings` must be one jax.sharding.Sharding or a pytree prefix of the "
                f"variables tree (whose top-level keys are {top}); it does not match: {e}"
            ) from None
    out = {}
    for (path, leaf), sharding in zip(flat, given, strict=True):
        shape, dtype = sharding_lib._shape_dtype(leaf)
        if isinstance(sharding, NamedSharding):
            if not shape:
                sharding = NamedSharding(sharding.mesh, PartitionSpec())
            sharding_lib.check_spec(path, shape, dtype, sharding.spec, sharding.mesh, "`shardings`")
        elif sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(
                f"`shardings` gives {path!r} {sharding!r}; expected a jax.sharding.Sharding "
                "or None."
            )
        out[path] = sharding
    return out
