"""The registry of sources: every ``Source`` the plan, the engine and the reports know.

``plan.build`` asks the sources in this order for each leaf: the first that recognizes
the leaf's initializer-tree value (None where no override names it) and plans it wins.
``engine.execute`` runs them in the same order, each with all of its leaves. Adding a
source is its module in this package and one line here.
"""

from __future__ import annotations

from flaxlazy._src.sources import array
from flaxlazy._src.sources import from_checkpoint
from flaxlazy._src.sources import initializer
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import own
from flaxlazy._src.sources import traced
from flaxlazy._src.sources.from_safetensors import source as from_safetensors

SOURCES: tuple[kinds.Source, ...] = (
    own.SOURCE,  # "flax": the module's own initializer, replayed alone
    initializer.SOURCE,  # "initializer": an initializer in `initializers=`
    array.SOURCE,  # "array": an array in `initializers=`
    from_checkpoint.SOURCE,  # "checkpoint": flaxlazy.from_checkpoint(...)
    from_safetensors.SOURCE,  # "safetensors": flaxlazy.from_safetensors(...)
    traced.SOURCE,  # "traced": one pruned run of the whole init (the fallback)
)

_BY_KIND = {source.kind: source for source in SOURCES}


def by_kind(kind: str) -> kinds.Source:
    """The source that writes ``kind`` in the plan.

    Examples:
      >>> by_kind("checkpoint").kind
      'checkpoint'
    """
    return _BY_KIND[kind]
