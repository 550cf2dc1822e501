"""
Pixels: images resized and patchified exactly as transformers' PIL image processor does
(`Qwen2VLImageProcessor` in 4.x, `Qwen2VLImageProcessorPil` in 5.x; numpy + PIL only;
tests/test_preprocess.py checks it bit for bit, and states where 4.x and 5.x differ: transparency,
see to_rgb), the visual-token budgets,
and the crop rule of a zoom-in (SPEC section 3). Everything the model sees of an image goes
through this file, so SFT, RL rollouts and evaluation resize, patchify and crop in exactly one
way. Its own file because it is the one part of the data path with a bit-exact oracle and no
notion of records, prompts or tokens (data.py builds on it).
"""

import math
import os

import numpy as np
import torch
from PIL import Image

from reward import MAX_ASPECT  # smart_resize refuses anything more elongated; one limit for crops and the reward

# -----------------------------------------------------------------------------
# constants (SPEC section 2 and 3)

PATCH = 14  # ViT patch side in pixels
MERGE = 2  # the patch merger groups 2x2 patches into one LLM token
TEMPORAL_PATCH = 2  # a still image is its own frame duplicated to 2 frames
FACTOR = PATCH * MERGE  # 28: resized sides are multiples of this so the 2x2 merge tiles the grid
MIN_PIXELS = 56 * 56  # 3136, Qwen's default lower bound
MAX_PIXELS = 12845056  # Qwen2.5-VL's preprocessor_config.json default (16384 tokens)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOTAL_VISUAL_TOKENS = 8192  # per-sample budget of the initial images (SPEC section 3, "Budget")


# -----------------------------------------------------------------------------
# resize and patchify (must match transformers' Qwen2VLImageProcessor exactly, SPEC 3)


def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """
    Qwen2-VL's resize rule: (height, width) -> (h, w), both multiples of `factor`, with
    min_pixels <= h*w <= max_pixels (up to the one-factor floor) and the aspect ratio kept
    as well as the rounding allows.

    Same arithmetic as transformers 4.57.6 `qwen2_vl.image_processing_qwen2_vl.smart_resize`
    (in 5.x the same function is in `image_processing_pil_qwen2_vl`): Python's banker's `round`
    first; if that is too big, shrink by beta = sqrt(area/max) and floor; if too small, grow by
    beta = sqrt(min/area) and ceil. The model was trained on exactly these grids and the bbox
    coordinates live in them.

    Inputs smaller than `factor` are NOT an error (transformers 4.57.6 does not raise: the
    first rounding gives 0, which is below min_pixels, so the ceil branch scales it up, e.g.
    1x1 -> 56x56). Non-positive sizes raise ValueError (transformers would divide by zero).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT}, got {max(height, width) / min(height, width)} "
            f"(height={height}, width={width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def display_of(size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(W, H) at which an image of pixel size (W, H) is shown to the model: the size of
    smart_resize's grid, which preprocess_image gives too (display_size of its grid_thw), from the
    size alone, so records are checked at load without decoding a pixel. Raises ValueError as
    smart_resize does (an aspect ratio above MAX_ASPECT)."""
    w, h = size
    h_bar, w_bar = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    return w_bar, h_bar


def image_size(path):
    """(W, H) of an image file from its header alone, no pixel decoding: records are checked at
    load with it. Errors as load_image's, naming the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def to_rgb(img):
    """
    A PIL image as RGB, any transparency composited onto white: what a viewer sees, and what the
    release's images were. The release's SFT, RL and eval load images with
    qwen_vl_utils.fetch_image, whose to_rgb pastes an RGBA image onto white (qwen-vl-utils >=
    0.0.9; bit for bit this result), and transformers 5.x's convert_to_rgb composites the same
    way every image with an alpha band or a transparency key. Two sources differ, on purpose
    (tests/test_preprocess.py states both): transformers 4.x drops alpha (plain convert("RGB"):
    the colours stored under transparent pixels show), and the release's to_rgb treats only
    mode RGBA so, converting LA, PA and palette images with a transparent colour plainly; we
    give those white like RGBA, as 5.x does. Otherwise plain conversion: P through its palette,
    L replicated to 3 channels.
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path):
    """
    Open an image file as an RGB PIL image (to_rgb), fully loaded (the file is closed afterwards).

    No EXIF rotation is applied (the Qwen-VL fine-tuning loaders open images the same way), so
    the pixels are the file's as stored. A missing file raises FileNotFoundError and an
    unreadable one ValueError, both naming the path, so a bad dataset row is easy to find.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return to_rgb(im)  # convert() loads the pixels and returns a new image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """
    One PIL image -> (pixel_values float32 (h*w, 1176), grid_thw int64 [1, h, w]), h and w in
    14-px patches. Equal (bit for bit) to transformers' PIL processor (`Qwen2VLImageProcessor`
    in 4.x, `Qwen2VLImageProcessorPil` in 5.x) with (min_pixels, max_pixels) on a single image,
    transparency as 5.x treats it (to_rgb); the steps and their dtypes mirror its `_preprocess`:

    1. convert to RGB (to_rgb, if not already), smart_resize, PIL BICUBIC resize of the uint8 image;
    2. rescale: uint8 -> float64 * (1/255) -> float32;
    3. normalise in float32: (x - mean) / std with CLIP mean/std as float32;
    4. duplicate the frame to TEMPORAL_PATCH=2 and patchify. Rows are ordered
       (t, h/2, w/2, 2, 2): the 4 patches of one 2x2 merge unit are consecutive, which is
       what the ViT's merger (SPEC section 2) expects; each row is (channel, temporal 2,
       14, 14) flattened = 3*2*14*14 = 1176 values, i.e. one Conv3d input.

    Unlike transformers we always treat the array as channels-last: transformers guesses the
    channel axis and gets images 1 or 3 pixels high wrong (it takes (3, W, 3) for CHW).

    Budgets (SPEC 3): pass max_pixels=budget_per_image(n) for the initial images of a sample
    and max_pixels=budget_per_crop() for zoom-in crops.
    """
    if img.mode != "RGB" or img.info.get("transparency") is not None:
        img = to_rgb(img)
    w, h = display_of(img.size, min_pixels, max_pixels)  # smart_resize's size: the one the header check predicts
    img = img.resize((w, h), resample=Image.Resampling.BICUBIC)  # transformers: PIL resize, reducing_gap=None
    x = np.asarray(img)  # (h, w, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale()
    mean = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32)
    x = (x - mean) / std  # transformers' normalize(), float32 throughout
    x = x.transpose(2, 0, 1)  # (3, h, w)
    x = np.stack([x] * TEMPORAL_PATCH)  # (2, 3, h, w): still image = duplicated frame
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(1, TEMPORAL_PATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    # -> (t, gh/2, gw/2, merge_h, merge_w, channel, temporal, patch_h, patch_w)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(gh * gw, 3 * TEMPORAL_PATCH * PATCH * PATCH)
    pixel_values = torch.from_numpy(np.ascontiguousarray(x))
    grid_thw = torch.tensor([1, gh, gw], dtype=torch.long)
    return pixel_values, grid_thw


def display_size(grid_thw):
    """
    (W, H) in pixels of the image as displayed to the model = (w*14, h*14). The model only
    ever sees this resized image, so its `bbox_2d` coordinates are in these pixels (SPEC 3,
    "Coordinates") and the prompt's size lines report this size.
    """
    _, h, w = (int(v) for v in grid_thw)
    return w * PATCH, h * PATCH


def n_visual_tokens(grid_thw):
    """LLM tokens of one image: patches / 4 after the 2x2 merger (t is 1 for still images)."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (MERGE * MERGE)


def budget_per_image(n_images, total_tokens=TOTAL_VISUAL_TOKENS):
    """
    max_pixels for each INITIAL image of a sample (SPEC 3, "Budget"): the sample's budget of
    `total_tokens` visual tokens = total_tokens*28*28 pixels, shared evenly by its n_images
    initial images (a video is 32 frames, each one image; 8192/32 = 256 tokens per frame).
    Crops do not share this budget: each crop is capped separately at the full budget, see
    budget_per_crop(). SFT in the release used a flat 200704 (256 tokens) per image instead;
    callers pass whichever they want as max_pixels.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return total_tokens * FACTOR * FACTOR // n_images


def budget_per_crop(total_tokens=TOTAL_VISUAL_TOKENS):
    """max_pixels for each zoom-in crop: the full budget, total_tokens*28*28 (SPEC 3), not shared."""
    return total_tokens * FACTOR * FACTOR


# -----------------------------------------------------------------------------
# the crop rule (SPEC section 3, "Coordinates" and "Crop rule")
#
# Every image of a trajectory (original or crop) carries
#   region  = (x1, y1, x2, y2), normalised [0, 1] coordinates in its ORIGINAL file
#             (an original is (0, 0, 1, 1)), and
#   display = (W, H), its size as displayed to the model (display_size of its grid).
# A bbox the model writes for image `index` is in that image's display pixels; mapping it
# through (region, display) gives a region of the original file, so a crop of a crop is
# always cut from the full-resolution original, never from an already-resized crop.


def _check_bbox(bbox, display):
    """Validate a bbox in display pixels: 4 finite numbers, 0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H."""
    W, H = display
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"bbox must be 4 numbers [x1, y1, x2, y2], got {bbox!r} (image size {W}x{H})")
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"bbox must be 4 finite numbers, got {bbox!r} (image size {W}x{H})")
    x1, y1, x2, y2 = bbox
    if not (0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H):
        raise ValueError(
            f"bbox {list(bbox)} is not a box inside the image of size {W}x{H} "
            f"(need 0 <= x1 < x2 <= {W} and 0 <= y1 < y2 <= {H})"
        )


def map_bbox(region, display, bbox):
    """
    A bbox in the displayed pixels of an image -> the normalised region of the ORIGINAL file.

    region: (x1, y1, x2, y2) of that image in its original, normalised; display: its (W, H).
    The display covers the region linearly (smart_resize stretches each axis on its own), so
    x_orig = rx1 + bx / W * (rx2 - rx1), and likewise for y. Raises ValueError naming the bbox
    and the size when the bbox is not strictly inside the image (degenerate, inverted, out of
    range): the rollout turns that into an error observation (SPEC 4).
    """
    _check_bbox(bbox, display)
    W, H = display
    rx1, ry1, rx2, ry2 = region
    bx1, by1, bx2, by2 = (float(v) for v in bbox)
    rw, rh = rx2 - rx1, ry2 - ry1
    out = (rx1 + bx1 / W * rw, ry1 + by1 / H * rh, rx1 + bx2 / W * rw, ry1 + by2 / H * rh)
    return tuple(min(1.0, max(0.0, v)) for v in out)  # clamp float round-off (PIL refuses box > size)


def crop_size(original_size, parent_region, parent_display, region):
    """
    Pixel size (w, h) to which the crop of `region` is resized (SPEC 3, "Crop rule"):
    scale = min(2 * s, 1/norm_w, 1/norm_h) applied to the region's size in original pixels,
    i.e. twice the size at which the region was shown inside its parent, but never larger
    than the original image's own width/height.

    s = displayed px per original px of the PARENT image. smart_resize does not keep the
    aspect exactly, so s differs slightly between x and y; we use one scalar for both axes,
    s = min(s_x, s_y), so the crop keeps the original's aspect and neither axis exceeds 2x
    its displayed size. Sizes are rounded to the nearest integer, at least 1.
    """
    OW, OH = original_size
    W, H = parent_display
    px1, py1, px2, py2 = parent_region
    s = min(W / ((px2 - px1) * OW), H / ((py2 - py1) * OH))
    x1, y1, x2, y2 = region
    nw, nh = x2 - x1, y2 - y1
    scale = min(2 * s, 1 / nw, 1 / nh)
    return max(1, round(nw * OW * scale)), max(1, round(nh * OH * scale))


def crop_geometry(original_size, parent_region, parent_display, bbox):
    """
    The geometry of a zoom-in, from sizes alone: (its normalised region in the original, the
    (w, h) its crop is resized to). crop_image cuts the pixels to exactly this, and records are
    checked at load with it (the sizes of crops that later tool calls draw boxes on), so the
    crop rule has one implementation. Raises ValueError (naming the bbox) for an invalid bbox,
    or when the crop would be more elongated than smart_resize accepts (aspect > 200).
    """
    region = map_bbox(parent_region, parent_display, bbox)
    w, h = crop_size(original_size, parent_region, parent_display, region)
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError(
            f"bbox {list(bbox)} gives a {w}x{h} crop, aspect ratio above {MAX_ASPECT}: too thin to encode"
        )
    return region, (w, h)


def crop_image(original, parent_region, parent_display, bbox):
    """
    Cut a zoom-in crop for a tool call: (crop PIL image, its normalised region).

    original: the full-resolution original file (PIL, RGB) the parent image comes from;
    parent_region / parent_display: the region and display size of the image the bbox was
    drawn on (an original or an earlier crop); bbox: [x1, y1, x2, y2] in its display pixels.

    The bbox is mapped to the original (crop_geometry: map_bbox, crop_size), and the original is
    cropped at those sub-pixel coordinates and resized with LANCZOS in one step (PIL
    `resize(box=...)`), to crop_size(). Resampling from the original rather than the parent keeps all the detail
    the file has, for crops of crops too.

    The caller then runs the crop through preprocess_image(crop, max_pixels=budget_per_crop())
    like any image: that smart_resize gives the crop's own display size and grid. Raises
    ValueError (naming the bbox) for an invalid bbox, or when the crop would be more
    elongated than smart_resize accepts (aspect > 200), so the rollout can report it.
    """
    OW, OH = original.size
    region, (w, h) = crop_geometry((OW, OH), parent_region, parent_display, bbox)
    x1, y1, x2, y2 = region
    box = (x1 * OW, y1 * OH, x2 * OW, y2 * OH)
    crop = original.resize((w, h), resample=Image.Resampling.LANCZOS, box=box)
    return crop, region
