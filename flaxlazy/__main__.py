"""``python -m flaxlazy inspect TARGET [options]``: see ``flaxlazy._src.cli``."""

import sys

from flaxlazy._src.cli import main

sys.exit(main())
