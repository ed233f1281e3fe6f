"""What a folder is before anything is written there: a new store, a marked one, an unmarked older one, or none (refused)."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import time
from pathlib import Path


from personal_vlm_node.errors import PersonalVLMError
from .layout import (SCHEMA_VERSION, _DB_FILE, _FILE_MODE, _LOCK_FILE, _MARKER_FILE, _MARKER_FORMAT,
                     _STORE_DIRS, _STORE_ENTRIES, _VERSION_NAME)
from .errors import _lost_index_error, _os_error
from .files import _file_size, _fsync_dir, _write_bytes


def identify_folder(root: Path) -> str:
    """What ``root`` is: "new" (missing or empty), "store" (marked) or "unmarked" (a store written
    before markers). Raises PersonalVLMError, changing nothing, for anything else."""
    try:
        info = os.stat(root)     # a symlinked root is the user's choice of where the store lives
    except FileNotFoundError:
        return "new"
    except OSError as e:
        raise _os_error(e, f"cannot open the concept store folder {root}") from e
    if not stat.S_ISDIR(info.st_mode):
        raise PersonalVLMError(f"the concept store {root} is a file, not a folder; set store_dir to a folder")
    try:
        entries = set(os.listdir(root))
    except OSError as e:
        raise _os_error(e, f"cannot read the concept store folder {root}") from e
    _refuse_links(root, entries)
    for entry in sorted(entries & _STORE_ENTRIES):
        path = root / entry
        is_dir = path.is_dir()
        if (entry in _STORE_DIRS) != is_dir:
            raise PersonalVLMError(
                f"{path} is a {'folder' if is_dir else 'file'} where a concept store keeps a "
                f"{'file' if is_dir else 'folder'}; {root} is not a concept store: set store_dir to an empty "
                "or new folder"
            )
    if _MARKER_FILE in entries:
        _check_marker(root)
        return "store"
    if not entries:
        return "new"
    foreign = sorted(entries - _STORE_ENTRIES)
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PersonalVLMError(
            f"{root} is not a concept store: it holds files personal_vlm_node did not write ({shown}); "
            "nothing was changed: set store_dir (--store) to an empty or new folder"
        )
    if _has_version_dirs(root / "concepts") and not _is_index(root / _DB_FILE):
        raise _lost_index_error(root, "missing or empty")
    if _is_index(root / _DB_FILE):
        return "unmarked"
    if _DB_FILE not in entries and all(_is_empty(root / entry) for entry in entries):
        return "new"         # a creation interrupted before anything was stored
    raise PersonalVLMError(
        f"{root} is not a concept store: its {', '.join(sorted(entries))} were not written by personal_vlm_node; "
        "nothing was changed: set store_dir (--store) to an empty or new folder"
    )


def _refuse_links(root: Path, entries: set[str]) -> None:
    """PersonalVLMError when one of the store's own entries in ``root`` is a symbolic link."""
    for entry in sorted(entries & _STORE_ENTRIES):
        if (root / entry).is_symlink():
            raise PersonalVLMError(
                f"{root / entry} is a symbolic link; a concept store never follows links inside its folder "
                "(they would let it change files elsewhere): put the folder or file itself there"
            )


def _is_index(path: Path) -> bool:
    """Whether ``path`` is an SQLite file holding this store's concept table (read without writing)."""
    if _file_size(path) == 0:
        return False
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return False
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='concepts'").fetchone() is not None
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return False


def _is_empty(path: Path) -> bool:
    try:
        return not any(os.scandir(path)) if path.is_dir() else path.stat().st_size == 0
    except OSError:
        return False


def _has_version_dirs(concepts_dir: Path) -> bool:
    try:
        with os.scandir(concepts_dir) as entries:
            return any(_VERSION_NAME.match(e.name) and e.is_dir(follow_symlinks=False) for e in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise _os_error(e, f"cannot read {concepts_dir}") from e


def _write_marker(root: Path) -> None:
    _write_bytes(root / _MARKER_FILE, (json.dumps(
        {"format": _MARKER_FORMAT, "version": SCHEMA_VERSION, "created": time.time()}) + "\n").encode())
    _fsync_dir(root)


def _check_marker(root: Path) -> None:
    path = root / _MARKER_FILE
    try:
        with open(path, "rb") as f:
            content = json.loads(f.read(4096) or b"null")
    except OSError as e:
        raise _os_error(e, f"cannot read {path}") from e
    except ValueError:
        content = None
    if not isinstance(content, dict) or content.get("format") != _MARKER_FORMAT:
        raise PersonalVLMError(
            f"{path} is not a concept store's marker (its content is not the one personal_vlm_node writes); "
            f"nothing was changed: set store_dir to an empty or new folder"
        )


def _can_write(root: Path) -> bool:
    """Whether this process can write in ``root``: tried, since permission bits do not tell about
    an immutable folder, a read-only mount or a root user."""
    # access() sees an immutable folder and a read-only mount (not a root user's mode bits: root
    # may write there, and does); SQLite must be able to create its log files beside the index.
    for path in (root, root / "concepts", root / "tmp", root / _DB_FILE):
        if path.exists() and not os.access(path, os.W_OK):
            return False
    probe = root / _LOCK_FILE
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, _FILE_MODE)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise _os_error(e, f"cannot open the concept store in {root}") from e
    os.close(fd)
    return True
