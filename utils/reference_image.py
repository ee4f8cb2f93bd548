"""The reference picture of image-to-3D: reading it, keying out a plain background, fitting it to the render size.

numpy, Pillow and scipy.ndimage, nothing of the project: `arguments/checks.py` runs `load_reference` before a run
writes anything, and the run uses the same function.

Rules (the README states them too):
- **Reading.** The picture is turned upright by its EXIF orientation (as viewers show it); a picture of more than 8
  bits per channel that Pillow keeps as one integer or float band (16-bit grey PNG, float TIFF) is refused, since
  Pillow's conversion to RGB would clip it at 255 rather than scale it.
- **Alpha.** A picture with an alpha channel (RGBA, LA, a palette with transparency) uses it as the mask, unless every
  pixel is opaque: then it is keyed like an RGB picture.
- **Keying an RGB picture.** The background colour b is the per-channel median of the border (the outermost row and
  column of pixels on each side). The border is plain when at least MIN_PLAIN_BORDER of its pixels lie within
  KEY_TOLERANCE of b (largest per-channel difference, colours in [0, 1]); otherwise the picture is refused. The
  background is every pixel within KEY_TOLERANCE of b that is connected to the border through such pixels
  (4-neighbourhood), so a white detail inside an object on white stays foreground. Mask: 0 background, 1 the rest.
- **Size.** `fit_to_size` pads the picture centred with background (mask 0) to the render's aspect ratio, then resizes
  it to width x height with Pillow's bilinear filter (antialiased when shrinking) on alpha-premultiplied colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# largest per-channel distance from the border's median colour that is still background (~15/255: JPEG noise)
KEY_TOLERANCE = 0.06
# share of border pixels that must lie within KEY_TOLERANCE of their median for the border to count as plain
MIN_PLAIN_BORDER = 0.95
# a mask covering less than this share of the picture is taken for an empty one
MIN_FOREGROUND = 1e-4


class ReferenceImageError(ValueError):
    """A reference picture that cannot be used; its message is one line, without the config key (the caller adds
    it)."""


@dataclass
class ReferenceImage:
    rgb: np.ndarray  # [H, W, 3] float32 in [0, 1] (meaningful where mask > 0)
    mask: np.ndarray  # [H, W] float32 in [0, 1]: 1 object, 0 background
    keyed: bool  # True: the mask was keyed out of an RGB picture (no usable alpha)
    background: tuple[float, float, float] | None  # the keyed background colour b


def read_picture(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The picture's colours [H, W, 3] and its alpha [H, W] (None without an alpha channel), floats in [0, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ReferenceImageError(f"'{path}' is not a file; give the path of a PNG or JPEG picture of the object "
                                  f"(RGBA, or RGB on a plain background)")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            deep = image.getbands() in (("I",), ("F",))  # 16/32-bit grey: convert() would clip it at 255, not scale
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if not deep:
                upright = ImageOps.exif_transpose(image)  # phones store JPEGs sideways, with an orientation tag
                array = np.asarray(upright.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ReferenceImageError(f"'{path}' is not a picture Pillow can read ({type(err).__name__}); give a PNG or "
                                  f"JPEG file") from None
    if deep:
        raise ReferenceImageError(f"'{path}' is a high-bit-depth greyscale picture (Pillow mode {mode}), which would "
                                  f"read as clipped, not scaled; save it as an 8-bit RGB or RGBA PNG")
    if array.ndim != 3 or min(array.shape[:2]) < 3:
        raise ReferenceImageError(f"'{path}' is {array.shape[1]}x{array.shape[0]} pixels; give a picture at least "
                                  f"3x3 (the keying reads its border)")
    return array[..., :3], (array[..., 3] if has_alpha else None)


def border_pixels(rgb: np.ndarray) -> np.ndarray:
    """The outermost row and column of pixels on each side, each pixel once: [2 (H + W) - 4, 3]."""
    return np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])


def key_background(rgb: np.ndarray, tolerance: float = KEY_TOLERANCE,
                   min_plain: float = MIN_PLAIN_BORDER) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Key out a plain background (module docstring). Returns the mask [H, W] (float32, 0 background, 1 object) and
    the background colour b. Raises ReferenceImageError when the border is not plain."""
    from scipy import ndimage

    border = border_pixels(rgb)
    b = np.median(border, axis=0)
    plain = float((np.abs(border - b).max(axis=1) <= tolerance).mean())
    if plain < min_plain:
        raise ReferenceImageError(f"has no alpha channel and its border is not a plain background (only {plain:.0%} "
                                  f"of the border pixels lie within {tolerance} of their median colour, "
                                  f"{min_plain:.0%} needed); give an RGBA picture with the background transparent")
    near = np.abs(rgb - b).max(axis=2) <= tolerance  # [H, W]
    labels, _ = ndimage.label(near)  # 4-neighbourhood components of background-coloured pixels
    touching = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, touching[touching > 0])
    return (~background).astype(np.float32), (float(b[0]), float(b[1]), float(b[2]))


def load_reference(path: str | Path) -> ReferenceImage:
    """The picture at its own size with its mask: from its alpha channel, else keyed (module docstring)."""
    rgb, alpha = read_picture(path)
    if alpha is not None and alpha.min() < 1.0:
        ref = ReferenceImage(rgb, alpha, keyed=False, background=None)
    else:
        try:
            mask, b = key_background(rgb)
        except ReferenceImageError as err:
            raise ReferenceImageError(f"'{path}' {err}") from None
        ref = ReferenceImage(rgb, mask, keyed=True, background=b)
    if ref.mask.mean() < MIN_FOREGROUND:
        raise ReferenceImageError(f"'{path}' shows no object: its mask is empty (alpha 0 or all background "
                                  f"colour); give a picture of the object")
    return ref


def fit_to_size(ref: ReferenceImage, width: int, height: int) -> ReferenceImage:
    """Pad centred with background to the aspect ratio width / height, then resize to [height, width] (module
    docstring). Colours outside the mask become 0."""
    from PIL import Image

    h, w = ref.mask.shape
    if w * height > h * width:  # wider than the render: pad rows
        new_h, new_w = round(w * height / width), w
    else:
        new_h, new_w = h, round(h * width / height)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    planes = np.zeros((new_h, new_w, 4), dtype=np.float32)
    planes[top:top + h, left:left + w, :3] = ref.rgb * ref.mask[..., None]  # premultiplied
    planes[top:top + h, left:left + w, 3] = ref.mask
    # float32 planes open as Pillow's mode "F"
    resized = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c])).resize(
        (width, height), Image.Resampling.BILINEAR)) for c in range(4)], axis=-1).clip(0.0, 1.0)
    mask = resized[..., 3]
    rgb = np.where(mask[..., None] > 1e-6, resized[..., :3] / np.maximum(mask[..., None], 1e-6), 0.0).clip(0.0, 1.0)
    return ReferenceImage(rgb.astype(np.float32), mask.astype(np.float32), ref.keyed, ref.background)
