"""Each plan leaf's initializer in words, for reports: `lecun_normal`, `override ...`.

The naming of initializers and recorded programs themselves is ``naming``.
"""

from __future__ import annotations

from typing import Any

from flaxlazy._src import paths
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import rules as rules_lib
from flaxlazy._src.naming import initializer_name
from flaxlazy._src.naming import program_name


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
        if leaf.source == plan_lib.FLAX:
            rec, _ = plan_lib._find_record(self._index, leaf.path)
            if rec is None:
                return "module"
            if getattr(rec, "init_fn", None) is None:  # NNX: a slice of the constructor
                return program_name(rec)
            return initializer_name(rec.init_fn)
        if leaf.source == plan_lib.INITIALIZER:
            rule = self._rules.get(paths.split_params(leaf.path)[0])
            return "override " + (initializer_name(rule.value) if rule is not None else "?")
        if leaf.source == plan_lib.CHECKPOINT:
            return f"checkpoint {leaf.value[1]}"
        return leaf.source  # "array", "traced"
