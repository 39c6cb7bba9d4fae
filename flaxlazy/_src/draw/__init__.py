"""How random values are drawn: the machinery below the sources, framework-free.

A random leaf's key is ``fold_in(root, fold)``, per layer for a stacked leaf (``keys``).
With the partitionable threefry, element ``i`` of the leaf is a pure function of that key
and ``i``, so it can be drawn in any blocks and still equal the whole draw bit for bit:

* ``flat``: the default on CPU. A leaf on one CPU device, keyed by a concrete threefry
  key, is drawn as flat blocks by one compiled threefry bits kernel plus its
  initializer's transform, compiled once per program whatever the leaf's shape; the
  bits kernel checks known answers against JAX before it draws anything.
* ``chunked``: a large leaf not drawn flat (on an accelerator, sharded: each device its
  own shard, or keyed inside a trace) runs its initializer block by block in one
  compiled loop, so its temporaries are one block's; ``flat`` re-expresses initializers
  on bits with it.
* ``host``: aligned host buffers that become CPU arrays without a copy, and the threads
  that share a call's blocks (and the safetensors reads) out among the CPU cores.

The sources decide which draw serves a leaf (``sources.compiled``); the self-checks in
``flaxlazy/_src/self_checks.py`` verify, once, that chunked draws equal whole draws here.
"""
