"""The store's file I/O: durable private writes, memories and pictures, record.json, and removing only what the store wrote."""

from __future__ import annotations

from typing import Iterator
import contextlib
import errno
import io
import json
import logging
import os
import stat
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load, save

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.images import ENCODED_INFO
from .errors import _os_error
from .layout import _LOCK_FILE, _FILE_MODE, _OWN_FILE, _PNG_MODES, _RECORD_FILE, _SUFFIXES

logger = logging.getLogger("personal_vlm_node.store")


try:
    import fcntl
except ImportError:  # not POSIX: writers in one process are still serialised by the thread lock
    fcntl = None


def _remove_version(path: Path) -> str | None:
    """Remove a version directory the store wrote: only the files it writes there, never through a
    link. Returns "path (reason)" when something is left, None when the directory is gone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} ({e.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} (not a folder the store wrote; left as it is)"
    strangers = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if _OWN_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                else:
                    strangers.append(entry.name)
        if strangers:
            return f"{path} (it holds files the store did not write: {', '.join(sorted(strangers)[:3])})"
        os.rmdir(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} ({e.strerror})"
    return None


def _record_bytes(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode("utf-8")


def _write_record_file(directory: Path, record: dict) -> None:
    """Replace ``directory``'s record.json atomically (a crash leaves the old one or the new one)."""
    target = directory / _RECORD_FILE
    staging = directory / (_RECORD_FILE + ".tmp")
    _write_bytes(staging, _record_bytes(record))
    os.rename(staging, target)
    _fsync_dir(directory)


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _check_pictures_present(directory: Path, n_images: int) -> None:
    for i in range(n_images):
        if not _reference_file(directory, i).is_file():
            raise FileNotFoundError(errno.ENOENT, "reference picture missing", str(directory / f"ref_{i}"))


def _make_private(path: Path, mode: int) -> None:
    """Set ``mode`` on a path this user owns (an existing store made under another umask too)."""
    try:
        if (os.stat(path).st_mode & 0o777) != mode:
            os.chmod(path, mode)
    except PermissionError as e:
        logger.warning("could not make %s private (%s)", path, e)


def _check_memory(memory) -> None:
    if not isinstance(memory, dict):
        raise TypeError(f"memory must be a dict of tensors, got {type(memory).__name__}")
    for key, value in memory.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"memory must map str to torch.Tensor, got {key!r}: {type(value).__name__}")
        # Stored, it would be reported as damage at every load: refused before anything is written.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise PersonalVLMError(
                f"the memory's {key!r} holds NaN or infinite values, so it was not stored: the model produced "
                "them (in float16 an overflow can); try dtype bfloat16 or float32")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a directory's entries (new files, renames) durable. POSIX only; elsewhere a directory
    # cannot be opened and the filesystem gives no such guarantee to ask for.
    if os.name == "posix":
        _fsync_file(path)


def _memory_bytes(memory: dict[str, torch.Tensor]) -> bytes:
    """A memory as safetensors bytes, each tensor on CPU and with storage of its own."""
    tensors = {}
    seen_storages = set()
    for key, value in memory.items():
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (views of one buffer); give those their own.
        storage = value.untyped_storage().data_ptr()
        if storage in seen_storages and value.numel() > 0:
            value = value.clone()
        seen_storages.add(storage)
        tensors[key] = value
    return save(tensors)


def _write_memory(path: Path, memory: dict[str, torch.Tensor]) -> None:
    _write_bytes(path, _memory_bytes(memory))


class _NonFinite(ValueError):
    """A memory file that reads but holds NaN or infinite values: damage, not a memory."""


def _read_memory(path: Path) -> dict[str, torch.Tensor]:
    # Read whole through one open file: loading by path would reopen the file after a concurrent
    # forget removed it, and fail with a raw RuntimeError instead of a retry.
    with open(path, "rb") as f:
        data = f.read()
    return _memory_from_bytes(data, path.name)


def _memory_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a memory's safetensors bytes; _NonFinite when one holds NaN or infinity."""
    tensors = load(data)
    for key, value in tensors.items():
        # A flipped bit can make a NaN that would spread through every score it enters.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _NonFinite(f"its memory holds NaN or infinite values (tensor {key!r} in {where})")
    return tensors


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, _FILE_MODE)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _png_ready(image: Image.Image) -> Image.Image:
    """The image in a mode PNG can hold, converting only what PNG cannot store."""
    if image.mode in _PNG_MODES:
        return image
    if image.mode == "F" or image.mode.startswith("I"):
        # 32-bit integer / float / other 16-bit layouts: keep 16-bit precision when the values
        # fit, otherwise fall back to 8-bit (Pillow clips).
        as_int = image.convert("I")
        low, high = as_int.getextrema()
        return as_int.convert("I;16") if low >= 0 and high <= 65535 else image.convert("L")
    if "A" in image.getbands() or "a" in image.getbands():
        return image.convert("RGBA")
    return image.convert("RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    _png_ready(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png(path: Path, image: Image.Image) -> None:
    _write_bytes(path, _png_bytes(image))


def _picture_bytes(image: Image.Image) -> tuple[bytes, str]:
    """What a reference picture is kept as: the photo's own file when it came encoded in a kept
    format (JPEG/PNG/WebP), else a PNG; with its file suffix."""
    encoded = kept_encoding(image)
    return encoded if encoded is not None else (_png_bytes(image), ".png")


def kept_encoding(image: Image.Image) -> tuple[bytes, str] | None:
    """The photo's own bytes and suffix when it came encoded in a format the store keeps as is."""
    encoded = image.info.get(ENCODED_INFO)
    if encoded is not None and encoded[1] in _SUFFIXES:
        return encoded[0], _SUFFIXES[encoded[1]]
    return None


def _reference_file(directory: Path, i: int) -> Path:
    """Reference picture ``i`` of a version: whichever of its kept formats is there."""
    for suffix in (".png", *_SUFFIXES.values()):
        candidate = directory / f"ref_{i}{suffix}"
        if candidate.is_file():
            return candidate
    return directory / f"ref_{i}.png"


def _read_picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        # A kept photo is upright as the user saw it when taught (ROIs are in that frame).
        upright = ImageOps.exif_transpose(image)
        return upright if upright is not image else image.copy()


def _copy_file(source: Path, target: Path) -> None:
    _write_bytes(target, source.read_bytes())


@contextlib.contextmanager
def _exclusive_lock(root: Path) -> Iterator[None]:
    """The store's writer lock, a flock on store.lock: one writer at a time across processes (a
    store's own writes, a repair). Not POSIX: no lock between processes, none to be had."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, _FILE_MODE)
    except OSError as e:
        raise _os_error(e, f"cannot lock the concept store in {root}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the flock
