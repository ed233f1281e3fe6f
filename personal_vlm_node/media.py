"""Pictures from files: the frames of an image, a folder of images or a video; image–mask pairs.

Front ends hand the frames to :meth:`Assistant.observe` one by one; nothing here knows of models.
Videos other than GIF need OpenCV, imported only when one is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from .errors import PersonalVLMError
from .images import IMAGE_SUFFIXES

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}


def natural_key(path: Path):
    """frame2 before frame10, as eval orders its images."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def frames(source: Path) -> Iterator[tuple[str, object]]:
    """(label, image) for every frame of an image, a folder of images (natural order) or a video.

    A folder's frames are file paths, read by whoever observes them (so one unreadable file can be
    skipped); a video's are decoded RGB images, labelled ``<file>#<index>``.
    """
    if not source.exists():
        raise PersonalVLMError(f"not found: {source}")
    if source.is_dir():
        files = sorted((p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        if not files:
            raise PersonalVLMError(f"no images in {source}")
        for path in files:
            yield path.name, str(path)
    elif is_video(source):
        yield from video_frames(source)
    elif source.is_file():
        yield source.name, str(source)
    else:
        raise PersonalVLMError(f"not found: {source}")


def video_frames(path: Path) -> Iterator[tuple[str, object]]:
    """(``<file>#<index>``, RGB image) for every frame of a GIF (Pillow) or another video (OpenCV)."""
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        index = 0
        try:
            with Image.open(path) as gif:
                for index, frame in enumerate(ImageSequence.Iterator(gif)):
                    yield f"{path.name}#{index}", frame.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise PersonalVLMError(f"{path.name} cannot be read past frame {index} ({exc}); "
                                   "is the file complete?") from exc
        return
    try:
        import cv2
    except ImportError as exc:
        raise PersonalVLMError("reading videos needs OpenCV: pip install opencv-python-headless "
                               "(or extract frames into a folder)") from exc
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise PersonalVLMError(f"cannot open video {path}")
    index = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        yield f"{path.name}#{index}", frame[:, :, ::-1].copy()        # BGR → RGB
        index += 1
    capture.release()


def image_mask_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) for every image in ``images_dir`` with a mask of the same stem in ``masks_dir``."""
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise PersonalVLMError(f"folder not found: {folder}")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = [(p, masks[p.stem]) for p in sorted(images_dir.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in masks]
    if not pairs:
        raise PersonalVLMError(f"no image in {images_dir} has a mask with the same name in {masks_dir}")
    return pairs
