"""The ``flaxlazy`` command, one package: ``args`` parses the command line, ``target``
loads what TARGET names and makes it ready for ``flaxlazy.inspect``, ``command`` runs it
and prints the report. ``main`` is the console script (``flaxlazy``, ``python -m
flaxlazy``).
"""

from flaxlazy._src.cli.command import main
from flaxlazy._src.cli.target import load_module

__all__ = ["load_module", "main"]
