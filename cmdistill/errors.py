"""One-line user-facing errors: bad input names its fix instead of a deep traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import sys
from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input or environment; printed as a single line."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """``e`` for a one-line message: its type and the first line of its text (at most ``limit`` characters)."""
    first = " ".join((str(e).strip().splitlines() or [""])[0].split())
    return f"{type(e).__name__}: {first[:limit]}" if first else type(e).__name__


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _errno_of(e: BaseException) -> int | None:
    """The OS error number of ``e``: an ``OSError``'s own, or the one that a library quotes in its message
    (safetensors: "os error 28", Rust's "code: 28")."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = re.search(r"(?:os error|code:)\s*(\d+)", str(e))
    return int(m.group(1)) if m else None


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def write_error(e: BaseException, path, fix: str = "") -> UserError | None:
    """The one-line error for a failed write of ``path`` when the cause is the disk or the permissions, else None.
    Libraries that lose the error number (torch's C++ writer says only 'basic_ios::clear') count as a full disk
    when less than 1 MiB is left where the file goes."""
    code = _errno_of(e)
    if code is None and not isinstance(e, OSError):
        free = _free_bytes(Path(path))
        if free is not None and free < 2**20:
            code = errno.ENOSPC
    if code in NO_SPACE:
        msg = f"no space left on device while writing {path}: free some space"
    elif code in NOT_WRITABLE:
        msg = f"cannot write {path} ({os.strerror(code).lower()}): make its folder writable"
    else:
        return None
    return UserError(msg + (f" {fix}" if fix else ""))


@contextlib.contextmanager
def writing(path, fix: str = ""):
    """Around a write of ``path``: a full disk, a permission error or a read-only file system becomes one
    :class:`UserError` line naming the file (``fix`` is appended); anything else propagates."""
    try:
        yield
    except UserError:  # already one line (a nested write naming its own file)
        raise
    except Exception as e:
        err = write_error(e, path, fix)
        if err is None:
            raise
        raise err from None


def exit_on_user_error(fn):
    """Decorate a command-line ``main``: a :class:`UserError` becomes ``error: ...`` and exit 2 (as does a
    full disk met anywhere: ``no space left on device while writing <file>``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            print(f"error: no space left on device while writing {e.filename or 'a file'}: free some space",
                  file=sys.stderr)
            sys.exit(2)

    return wrapper
