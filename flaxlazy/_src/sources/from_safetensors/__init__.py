"""Parameters read from safetensors files (``flaxlazy.from_safetensors``), one source.

* ``files``: the format, as its specification defines it (an 8-byte little-endian header
  length, a JSON header, a byte buffer every tensor of which the header indexes), shard
  indexes, and reading one box of a tensor from the memory-mapped file;
* ``mapping``: rules from model paths to checkpoint keys, and the transforms (transpose,
  reshape, split, stacking layers) applied to views of the mapped tensor;
* ``layouts``: ready-made rules for Hugging Face Llama-style and GPT-2 checkpoints;
* ``source``: the ``Source`` itself: ``from_safetensors``, planning (every check, from
  headers alone), describing, reporting unused tensors;
* ``shards``: executing: each device's shard read as the box it needs.
"""
