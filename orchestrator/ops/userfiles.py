"""Reading a file the user names (a topology, scenario or sweep file, the state file): only a
regular file, and only up to a limit. A plain open() and read() of a symlink to /dev/zero
reads until the memory runs out, and an open() of a FIFO waits for a writer, deaf to Ctrl-C."""

from __future__ import annotations

import os
import stat
import tomllib
from typing import Any

MIB = 1 << 20
TOML_LIMIT = 16 * MIB  # topology, scenario and sweep files: 256 full VMs take under 100 KB

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UserFileError(ValueError):
    """A file that cannot be used as it is: not a regular file, too large, or no TOML to read."""


def file_kind(mode: int) -> str:
    """What a file of `mode` is (a FIFO, a directory, ...), in the words of an error line."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def in_the_way(path: str) -> str:
    """Why os.makedirs(path, exist_ok=True) found `path` in the way, which it says only as
    "File exists": a file of another kind, a loop of symbolic links, a link to nothing."""
    try:
        return f"not a directory ({file_kind(os.stat(path).st_mode)})"
    except FileNotFoundError:
        target = os.readlink(path)
        return f"a symbolic link to {target[:200]!r}, which does not exist"
    except OSError as exc:  # ELOOP: "Too many levels of symbolic links"
        return exc.strerror or str(exc)


def read_limited(path: str, limit: int) -> bytes:
    """The content of the regular file `path`, of at most `limit` bytes (a multiple of a MiB).

    OSError as open() raises it (FileNotFoundError, PermissionError, ...); UserFileError for a
    file of another kind (refused after the open: O_NONBLOCK opens a FIFO without waiting for
    a writer) or a larger one (at most `limit` + 1 bytes are read to tell)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # before open(fd): that raises IsADirectoryError on a directory
        os.close(fd)
        raise UserFileError(f"not a regular file ({file_kind(mode)})")
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserFileError(f"larger than the {limit // MIB} MiB limit")
    return data


def read_toml_text(path: str) -> str:
    """The text of the TOML file `path` (a topology, scenario or sweep file), or UserFileError
    with one line that starts with the path: no such file, why it cannot be read (strerror,
    never "[Errno 5] ..."), not a regular file or too large, not UTF-8 (which byte, where)."""
    try:
        return read_limited(path, TOML_LIMIT).decode("utf-8")
    except FileNotFoundError:
        raise UserFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserFileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserFileError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); TOML files are UTF-8"
        ) from None
    except UserFileError as exc:
        raise UserFileError(f"{path}: {exc}") from None


def parse_toml(text: str) -> dict[str, Any]:
    """`text` as a TOML document, or UserFileError with one line. tomllib recurses once per
    level of nested arrays and inline tables: a few hundred levels raise RecursionError."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserFileError(f"not valid TOML: {exc}") from None
    except RecursionError:
        raise UserFileError("not usable TOML: arrays or inline tables nested too deeply") from None
