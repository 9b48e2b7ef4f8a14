"""One-line user-facing errors: bad input names its fix instead of a deep traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error caused by the user's input or environment; printed as a single line."""


def exit_on_user_error(fn):
    """Decorate a command-line ``main``: a :class:`UserError` becomes ``error: ...`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
