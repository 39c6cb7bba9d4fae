"""Each plan leaf's origin in words, for reports: ``lecun_normal``, ``override ...``,
``checkpoint params/Dense_0/kernel``: the leaf's source describes it
(``Source.describe``). The naming of initializers themselves is ``naming``.
"""

from __future__ import annotations

from typing import Any

from flaxlazy._src import paths
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import rules as rules_lib
from flaxlazy._src.naming import initializer_name  # noqa: F401 - the names, as before
from flaxlazy._src.naming import program_name  # noqa: F401
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import registry


class Names:
    """Each plan leaf's initializer, in words (``Names(traced, initializers).of(leaf)``)."""

    def __init__(self, traced: Any, initializers: Any):
        self._index = plan_lib._record_index(traced)
        prefix = paths.PARAMS + paths.SEP
        flat = paths.flatten(traced.variables)[0]
        inner = [p[len(prefix):] for p, _ in flat if p.startswith(prefix)]
        rules = rules_lib.normalize(initializers, what="initializers")
        self._rules = rules_lib.assign(rules, inner, what="initializers", allow_unused=True)

    def of(self, leaf: plan_lib.Leaf) -> str:
        """The leaf's origin in words, as its source describes it."""
        rec, _ = plan_lib._find_record(self._index, leaf.path)
        inner, qualified = paths.split_params(leaf.path)
        rule = self._rules.get(inner) if inner != qualified else None  # params only
        return registry.by_kind(leaf.source).describe(leaf, kinds.Found(rec, rule))
