"""Sources: the ``flaxlazy._src.sources`` package; see ``kinds`` for the interface."""
