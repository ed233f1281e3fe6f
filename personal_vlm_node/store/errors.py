"""Every SQLite and file-system error as one line naming its real cause, with the advice for that cause."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path


from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import find_lookalike, quoted
from .layout import _DB_FILE


# SQLite's primary result codes (the low byte of sqlite3.Error.sqlite_errorcode).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8


_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14


_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26


def _lost_index_error(root: Path, how: str) -> PersonalVLMError:
    return PersonalVLMError(
        f"the concept index {root / _DB_FILE} is {how} but {root / 'concepts'} holds concepts; nothing was "
        f"changed: run 'personal-vlm --store {root} store repair' to rebuild the index from the concept folders"
    )


def _index_error(error: sqlite3.Error, root: Path) -> PersonalVLMError:
    """One line for an SQLite error, naming its real cause and what to do about it."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    index = root / _DB_FILE
    if code == _SQLITE_FULL or (code in (_SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN)
                                and _disk_nearly_full(root)):
        # On a full disk SQLite's own words vary ("disk I/O error", "readonly database" when the
        # index could only be read as it is): the cause is the free space, said as such.
        return PersonalVLMError(
            f"the disk holding the concept store {root} is full ({_free_space(root)} free); nothing was "
            "changed: free some space and try again"
        )
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return PersonalVLMError(
            f"the concept index {index} is damaged ({error}); the concepts' folders are intact: run "
            f"'personal-vlm --store {root} store repair' to rebuild the index from them"
        )
    if code in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_AUTH) or (code == _SQLITE_CANTOPEN and root.is_dir()):
        return PersonalVLMError(
            f"cannot use the concept index {index} ({error}): this user may not write there (permissions, an "
            "immutable folder or a read-only disk); check them, or set store_dir to a writable folder"
        )
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return PersonalVLMError(
            f"the concept index {index} stayed locked by another program for 30 s ({error}); try again"
        )
    if code == _SQLITE_IOERR:
        return PersonalVLMError(
            f"the disk reported an error on the concept index {index} ({error}); check the disk (dmesg) and try again"
        )
    return PersonalVLMError(f"the concept index {index} cannot be used ({error})")


def _os_error(error: OSError, doing: str) -> PersonalVLMError:
    """One line for a failed file operation: ``doing``, then the real cause and the right advice."""
    number = error.errno
    if number in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full (or the user's quota used up): free some space and try again"
    elif number in (errno.EACCES, errno.EPERM):
        advice = ("permission denied: the folder is read-only, immutable or another user's; check its permissions, "
                  "or set store_dir to a writable folder")
    elif number == errno.EROFS:
        advice = "the file system is mounted read-only; set store_dir to a writable folder"
    elif number == errno.EIO:
        advice = "the disk reported an I/O error; check the disk (dmesg)"
    else:
        advice = "set store_dir to a writable folder if this persists"
    where = f" ({error.filename})" if error.filename else ""
    return PersonalVLMError(f"{doing}: {error.strerror or error}{where}; {advice}")


def _free_space(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free // 1024} KiB"
    except OSError:
        return "unknown space"


def _disk_nearly_full(root: Path) -> bool:
    try:
        return shutil.disk_usage(root).free < 1 << 20
    except OSError:
        return False


def _reason_of(error: PersonalVLMError) -> str:
    """A damage message's reason part: what follows "is damaged: " when there is one."""
    text = str(error)
    marker = " is damaged: "
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.rsplit("; forget it and teach it again", 1)[0]
    return text


def _exists_error(name: str) -> PersonalVLMError:
    return PersonalVLMError(f"a concept named {quoted(name)} already exists; pass overwrite to replace it")


def _damaged_error(name: str, reason: str) -> PersonalVLMError:
    return PersonalVLMError(
        f"concept {quoted(name)} is damaged: {reason}; forget it and teach it again"
    )


def _missing_error(name: str, known: list[str]) -> PersonalVLMError:
    """No concept ``name`` among ``known``: a look-alike is pointed at, else what is known."""
    known = sorted(known)
    lookalike = find_lookalike(name, known)
    if lookalike is not None:
        return PersonalVLMError(f"no concept named {quoted(name)}; did you mean {quoted(lookalike)}? "
                                "(the names differ only in characters that look alike)")
    if not known:
        hint = "no concepts are taught yet"
    else:
        listed = ", ".join(quoted(n) for n in known[:10]) + (", ..." if len(known) > 10 else "")
        hint = f"known concepts: {listed}"
    return PersonalVLMError(f"no concept named {quoted(name)}; teach it first ({hint})")
