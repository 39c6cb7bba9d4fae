"""NNX state as a variables tree: how NNX variables are addressed everywhere in flaxlazy.

``nnx.Param`` values live in the ``params`` collection at their state path
(``blocks/0/mlp/kernel``); every other variable in the collection NNX registers for its
type (``BatchStat``: ``batch_stats``, ``Cache``: ``cache``) or, unregistered, its class
name (``RngKey``, ``RngCount``, a custom ``Counter``), e.g. ``batch_stats/bn/mean``.
Initializer trees match paths inside ``params``; partition rules match paths inside
``params`` and collection-qualified paths elsewhere, exactly as for Linen. NNX sharding
annotations become Flax partitioning boxes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from flaxlazy._src import _compat
from flaxlazy._src import paths


def is_nnx(tree: Any) -> bool:
    """Whether ``tree`` is an NNX object (a module, an optimizer, Rngs) or an ``nnx.State``."""
    return isinstance(tree, (nnx.Pytree, nnx.State))


def collection(variable: Any) -> str:
    """The collection an NNX variable is addressed by (``params`` for ``nnx.Param``)."""
    if not isinstance(variable, nnx.Variable):
        return "data"
    kind = type(variable)
    if issubclass(kind, nnx.Param):
        return paths.PARAMS
    return _compat.nnx_variable_name(kind) or kind.__name__


def qualified(state_path: tuple, variable: Any) -> tuple[str, tuple[str, ...]]:
    """``(collection, path)`` of a state leaf."""
    return collection(variable), tuple(str(p) for p in state_path)


def box(value: Any, variable: Any, logical: bool = False) -> Any:
    """``value`` in a Flax partitioning box if ``variable`` has a sharding annotation."""
    names = _compat.nnx_sharding_names(variable) if isinstance(variable, nnx.Variable) else None
    if not names:
        return value
    rules = _compat.nnx_sharding_rules(variable)
    if logical or rules:
        return nn.LogicallyPartitioned(value, tuple(names), rules=rules or None)
    return nn.Partitioned(value, tuple(names))


def insert(tree: dict, col: str, path: tuple[str, ...], value: Any) -> None:
    node = tree.setdefault(col, {})
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


def state_of(tree: Any) -> nnx.State:
    """``nnx.state`` of an NNX object; a state as is."""
    return tree if isinstance(tree, nnx.State) else nnx.state(tree)


def flat_state(tree: Any) -> list[tuple[tuple, Any]]:
    """``[(state path, leaf)]`` of an NNX object or state."""
    return list(nnx.to_flat_state(state_of(tree)))


def as_variables(tree: Any) -> dict:
    """An NNX object or state as ``{collection: nested dict}``, annotations boxed.

    Examples:
      >>> from flax import nnx
      >>> tree = as_variables(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> sorted(tree), sorted(tree["params"]), sorted(tree["batch_stats"])
      (['batch_stats', 'params'], ['bias', 'scale'], ['mean', 'var'])
    """
    out: dict = {}
    for state_path, leaf in flat_state(tree):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        col, path = qualified(state_path, leaf)
        insert(out, col, path, box(value, leaf))
    return out


def like_state(tree: Any, by_path: dict[str, Any]) -> Any:
    """An ``nnx.State`` of ``tree``'s structure with ``by_path[qualified path]`` as values."""
    flat = []
    for state_path, leaf in flat_state(tree):
        col, path = qualified(state_path, leaf)
        value = by_path[paths.SEP.join((col,) + path)]
        flat.append((state_path, leaf.replace(value) if isinstance(leaf, nnx.Variable) else value))
    return nnx.from_flat_state(flat)
