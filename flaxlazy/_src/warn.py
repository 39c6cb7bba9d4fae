"""Warnings attributed to the user's line, not to the flaxlazy frame that raised them."""

from __future__ import annotations

import os
import sys

# The flaxlazy package directory (this file is flaxlazy/_src/warn.py), with a separator so
# that a sibling such as "flaxlazy_extras/" does not count as inside.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first frame outside flaxlazy.

    Call it where the warning is issued: ``warnings.warn(msg, UserWarning,
    stacklevel=user_stacklevel())``. It counts frames outward from its caller (stacklevel 1)
    to the first one whose code lives outside the flaxlazy package, so the warning names the
    user's file and line however deep inside flaxlazy it was raised, and stays right when
    flaxlazy's internal call chain changes. ``-W error::UserWarning:module`` filters then
    match the user's module, not flaxlazy's.

    Returns:
      The stacklevel (1 if the caller itself is outside flaxlazy).

    Examples:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...   warnings.simplefilter("always")
      ...   warnings.warn("example", UserWarning, stacklevel=user_stacklevel())
      >>> caught[0].filename  # this doctest, not flaxlazy/_src/warn.py
      '<doctest ...user_stacklevel...>'
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level
