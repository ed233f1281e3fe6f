"""Frames from files: an image, a folder in natural order, a GIF; image–mask pairs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from personal_vlm_node import media
from personal_vlm_node.errors import PersonalVLMError


def _picture(seed: int, size=(32, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_a_folder_gives_its_images_in_natural_order_and_ignores_other_files(tmp_path):
    for name in ("frame10.png", "frame2.png", "Frame1.jpg"):
        _picture(len(name)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    labels = [label for label, _ in media.frames(tmp_path)]
    assert labels == ["Frame1.jpg", "frame2.png", "frame10.png"]


def test_a_gif_gives_one_rgb_image_per_frame_labelled_by_index(tmp_path):
    gif = tmp_path / "clip.gif"
    pictures = [_picture(i) for i in range(3)]
    pictures[0].save(gif, save_all=True, append_images=pictures[1:])
    frames = list(media.frames(gif))
    assert [label for label, _ in frames] == ["clip.gif#0", "clip.gif#1", "clip.gif#2"]
    assert all(image.mode == "RGB" and image.size == (32, 24) for _, image in frames)
    assert media.is_video(gif) and not media.is_video(tmp_path / "a.png")


def test_a_truncated_gif_says_where_it_stopped(tmp_path):
    gif = tmp_path / "clip.gif"
    pictures = [_picture(i, (64, 64)) for i in range(4)]
    pictures[0].save(gif, save_all=True, append_images=pictures[1:])
    gif.write_bytes(gif.read_bytes()[:200])
    with pytest.raises(PersonalVLMError, match=r"clip.gif cannot be read past frame \d+"):
        list(media.frames(gif))


def test_a_missing_source_or_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(PersonalVLMError, match="not found"):
        list(media.frames(tmp_path / "missing.gif"))
    with pytest.raises(PersonalVLMError, match="no images in"):
        list(media.frames(tmp_path))


def test_images_pair_with_the_masks_of_the_same_stem(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in ("a", "b", "c"):
        _picture(1).save(images / f"{stem}.png")
    for stem in ("a", "c"):
        _picture(2).save(masks / f"{stem}.png")
    assert media.image_mask_pairs(images, masks) == [(images / "a.png", masks / "a.png"),
                                                      (images / "c.png", masks / "c.png")]
    with pytest.raises(PersonalVLMError, match="has a mask with the same name"):
        media.image_mask_pairs(masks / "..", masks)
    with pytest.raises(PersonalVLMError, match="folder not found"):
        media.image_mask_pairs(tmp_path / "none", masks)
