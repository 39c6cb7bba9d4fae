"""Checkpoint I/O: atomic save, read into shardings, integrity; framework-free.

A checkpoint is one Orbax PyTree directory whose entries are named by canonical paths:

* ``orbax_io``: ``save`` a tree, list its ``entries``, ``read`` chosen entries straight
  into their target shardings, all through Orbax.
* ``folders``: where ``save`` writes: refused paths, a private staging folder beside the
  target, and the one rename that puts a complete checkpoint in place.
* ``integrity``: the CRC-32s ``save`` records and ``read`` checks, and the one "damaged
  or incomplete" error.
* ``restore``: the public ``restore`` (a whole tree into an abstract target) and
  ``from_checkpoint`` (a ``CheckpointSource`` in ``initializers=``; the source that reads
  it is ``sources.from_checkpoint``).
"""
