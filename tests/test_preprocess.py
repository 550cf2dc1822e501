"""
Image preprocessing and the crop rule (pixels.py, SPEC section 3). CPU only, a few seconds.

transformers is used only here, as the oracle: our resize/patchify must equal its PIL image
processor (SPEC 3: "Must match ... exactly"), under 4.57 and 5.x (conftest.hf_image_processor).
The one rule on which the two disagree, transparency, is stated where it is tested.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import pixels
from conftest import SHARED, TRANSFORMERS_5, hf_image_processor, hf_smart_resize
from pixels import (
    FACTOR,
    MAX_PIXELS,
    MIN_PIXELS,
    budget_per_crop,
    budget_per_image,
    crop_image,
    crop_size,
    display_size,
    load_image,
    map_bbox,
    n_visual_tokens,
    preprocess_image,
    smart_resize,
)

FIXTURES = os.path.join(SHARED, "fixtures", "images")
FIXTURE_FILES = ["10095.png", "10149.png", "COCO_train2014_000000580957.jpg"]
SETTINGS = [
    (MIN_PIXELS, 200704),  # the release's SFT setting: <= 256 tokens per image
    (MIN_PIXELS, budget_per_image(3)),  # 8192-token budget over 3 initial images
    (MIN_PIXELS, MAX_PIXELS),  # Qwen default: no downscale for small images
    (401408, MAX_PIXELS),  # forces upscaling (ceil branch)
    (MIN_PIXELS, 12544),  # tiny budget (16 tokens): heavy downscale
]


def hf_preprocess(img, min_pixels, max_pixels, **kw):
    proc = hf_image_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=[img], return_tensors="pt", **kw)
    return out["pixel_values"], out["image_grid_thw"]


def assert_parity(img, min_pixels, max_pixels, ref_img=None, **kw):
    """Our preprocess_image(img) against transformers' processor on ref_img (default: img)."""
    pv, thw = preprocess_image(img, min_pixels=min_pixels, max_pixels=max_pixels)
    ref_pv, ref_thw = hf_preprocess(img if ref_img is None else ref_img, min_pixels, max_pixels, **kw)
    assert thw.dtype == torch.long and pv.dtype == torch.float32
    assert thw.tolist() == ref_thw[0].tolist()
    assert pv.shape == ref_pv.shape
    diff = (pv - ref_pv).abs().max().item()
    assert diff <= 1e-5, diff
    return diff


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


# ----------------------------------------------------------------------------- smart_resize


def test_smart_resize_matches_transformers():
    sides = [1, 2, 13, 14, 27, 28, 29, 41, 42, 55, 56, 57, 100, 281, 314, 359, 422, 428, 640, 1000, 1023, 3000, 7680]
    for min_px, max_px in SETTINGS:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, FACTOR, min_px, max_px) == hf_smart_resize(h, w, FACTOR, min_px, max_px), (
                    h, w, min_px, max_px)


def test_smart_resize_properties():
    # sides multiples of 28 and within the pixel bounds (for non-extreme aspect ratios)
    for h, w in [(800, 1000), (4320, 7680), (30, 3000), (56, 56), (3, 5)]:
        rh, rw = smart_resize(h, w, max_pixels=200704)
        assert rh % 28 == 0 and rw % 28 == 0
        assert MIN_PIXELS <= rh * rw <= 200704
    # inputs below the factor do not raise (transformers 4.57.6 neither): they are scaled up
    assert smart_resize(1, 1) == (56, 56)
    # ... and oddly: a 10x1000 strip first rounds to 0x1008 (0 px < min_pixels), so the ceil
    # branch rescales BOTH sides by sqrt(3136/10000) = 0.56: the long side shrinks to 560.
    assert smart_resize(10, 1000) == (28, 560)


def test_smart_resize_rejects_bad_sizes():
    assert smart_resize(1, 200)  # exactly 200 is allowed
    for h, w in [(1, 201), (201, 1), (10, 2001), (28, 6000)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


# ----------------------------------------------------------------------------- preprocess parity


@pytest.mark.parametrize("name", FIXTURE_FILES)
@pytest.mark.parametrize("min_pixels,max_pixels", SETTINGS)
def test_preprocess_matches_transformers_on_fixtures(name, min_pixels, max_pixels):
    img = load_image(os.path.join(FIXTURES, name))
    assert_parity(img, min_pixels, max_pixels)


def test_preprocess_is_bit_exact():
    img = load_image(os.path.join(FIXTURES, FIXTURE_FILES[2]))
    assert assert_parity(img, MIN_PIXELS, 200704) == 0.0


@pytest.mark.parametrize("w,h", [(28, 4000), (4000, 28), (3000, 30), (30, 3000), (1, 1), (5, 3), (3, 5), (1, 150),
                                 (57, 85)])
@pytest.mark.parametrize("max_pixels", [200704, budget_per_image(3)])
def test_preprocess_matches_transformers_extreme_shapes(w, h, max_pixels):
    img = random_image(w, h, seed=w * 7 + h)
    # transformers guesses the channel axis of the numpy array and takes an (H, W, 3) array
    # with H in {1, 3} for channels-first (a 1x1 image even crashes), so we tell it the truth.
    assert_parity(img, MIN_PIXELS, max_pixels, input_data_format="channels_last")


# Transparency. transformers 4.x converts plainly (alpha dropped: the colours stored under
# transparent pixels show); transformers 5.x composites every image with an alpha band or a
# transparency key onto white; the release's loader (qwen_vl_utils.fetch_image's to_rgb) pastes
# RGBA images onto white and converts every other mode plainly. pixels.to_rgb composites onto
# white like 5.x: the release's own pixels for RGBA, white rather than hidden colours for the rest.
ALPHA_MODES = ["RGBA", "LA", "P+transparency"]


def mode_image(mode, w=300, h=200, seed=3):
    if mode.startswith("P"):
        img = random_image(w, h, "RGB", seed=seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        if mode == "P+transparency":
            img.info["transparency"] = 0  # palette entry 0 is transparent (a PNG tRNS chunk)
        return img
    return random_image(w, h, mode, seed=seed)


def on_white(img):
    """img with its transparency composited onto white, written out: pasted onto white through its
    alpha (the release's formula for RGBA, applied to the image as RGBA)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGB", img.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.split()[3])
    return white


def release_to_rgb(img):
    """The release's loader, written out (qwen_vl_utils.fetch_image's to_rgb, qwen-vl-utils >= 0.0.9)."""
    return on_white(img) if img.mode == "RGBA" else img.convert("RGB")


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "P+transparency"])
def test_preprocess_matches_transformers_other_modes(mode):
    img = mode_image(mode)
    if mode not in ALPHA_MODES or TRANSFORMERS_5:
        assert_parity(img, MIN_PIXELS, 200704)  # transformers' processor as it is
        return
    # transformers 4.x drops alpha where we (and 5.x) composite onto white: its processor is the
    # oracle for the resize and patchify of the composited image, and differs on the image itself
    assert_parity(img, MIN_PIXELS, 200704, ref_img=on_white(img))
    assert not torch.equal(hf_preprocess(img, MIN_PIXELS, 200704)[0], preprocess_image(img, MIN_PIXELS, 200704)[0])


def test_transparency_is_composited_onto_white():
    for mode in ALPHA_MODES:
        img = mode_image(mode)
        ours = np.asarray(pixels.to_rgb(img))
        assert np.array_equal(ours, np.asarray(on_white(img))), mode
        if mode == "RGBA":  # bit for bit the release's pixels
            assert np.array_equal(ours, np.asarray(release_to_rgb(img)))
        else:  # the release's to_rgb converts these plainly, dropping alpha: here we differ from it
            assert not np.array_equal(ours, np.asarray(release_to_rgb(img))), mode


def test_load_image_modes_match_transformers_convert(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    for mode in ["RGBA", "L", "LA", "P", "P+transparency"]:
        path = tmp_path / f"x_{mode}.png"
        mode_image(mode, 40, 30, seed=5).save(path)
        loaded = load_image(path)
        assert loaded.mode == "RGB" and loaded.size == (40, 30)
        with Image.open(path) as im:
            if TRANSFORMERS_5:
                ref = convert_to_rgb(im, return_numpy=True)
            else:
                ref = np.asarray(convert_to_rgb(im))
                if mode in ALPHA_MODES:  # 4.x drops alpha; we composite onto white (see above)
                    assert not np.array_equal(np.asarray(loaded), ref), mode
                    ref = np.asarray(on_white(im))
        assert np.array_equal(np.asarray(loaded), ref), mode


def test_patch_order():
    """Row 0 is the top-left 14x14 patch, rows 0-3 are one 2x2 merge unit (row-major), each row
    is (channel, temporal 2, 14, 14) with the two temporal copies identical."""
    img = random_image(56, 56, seed=1)
    pv, thw = preprocess_image(img)
    assert thw.tolist() == [1, 4, 4] and pv.shape == (16, 1176)
    x = np.asarray(img).astype(np.float64) / 255
    x = (x - np.array(pixels.OPENAI_CLIP_MEAN)) / np.array(pixels.OPENAI_CLIP_STD)  # (56, 56, 3)
    rows = pv.reshape(16, 3, 2, 14, 14).double()
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])
    # (row index, top-left pixel of its patch): merge unit (0,0) then unit (0,1) then unit (1,0)
    for r, (py, px) in [(0, (0, 0)), (1, (0, 14)), (2, (14, 0)), (3, (14, 14)), (4, (0, 28)), (8, (28, 0))]:
        ref = torch.from_numpy(x[py:py + 14, px:px + 14].transpose(2, 0, 1).copy())
        assert (rows[r, :, 0] - ref).abs().max() < 1e-5, r


def test_sizes_and_budgets():
    thw = torch.tensor([1, 28, 34])
    assert display_size(thw) == (34 * 14, 28 * 14)
    assert n_visual_tokens(thw) == 28 * 34 // 4
    assert n_visual_tokens((1, 16, 16)) == 64
    assert budget_per_image(1) == 8192 * 784 == budget_per_crop()
    assert budget_per_image(32) == 200704  # a 32-frame video: 256 tokens per frame
    assert budget_per_image(3) == 8192 * 784 // 3
    with pytest.raises(ValueError):
        budget_per_image(0)
    # the budget really bounds the tokens of the preprocessed image
    img = random_image(4000, 3000, seed=2)
    _, thw = preprocess_image(img, max_pixels=budget_per_image(3))
    assert n_visual_tokens(thw) <= 8192 // 3


# ----------------------------------------------------------------------------- crop rule


def gradient_image(w=1000, h=800):
    """R encodes x (round(x/4)), G encodes y (round(y/4)), B constant: a pixel's colour says where it came from."""
    xs = np.round(np.arange(w) / 4).astype(np.uint8)
    ys = np.round(np.arange(h) / 4).astype(np.uint8)
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = xs[None, :]
    arr[..., 1] = ys[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr)


def expected_rg(u, v):
    """Colour of the gradient at continuous original coordinates (u, v) (pixel k spans [k, k+1])."""
    return (u - 0.5) / 4, (v - 0.5) / 4


def check_corners(crop, box, tol=1.5):
    """The crop's corner pixels show the original at the corresponding corners of `box` (original px)."""
    x1, y1, x2, y2 = box
    w, h = crop.size
    a = np.asarray(crop).astype(np.float64)
    for i, j in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (w // 2, h // 2)]:
        u = x1 + (i + 0.5) * (x2 - x1) / w
        v = y1 + (j + 0.5) * (y2 - y1) / h
        er, eg = expected_rg(u, v)
        assert abs(a[j, i, 0] - er) <= tol and abs(a[j, i, 1] - eg) <= tol, (i, j, a[j, i], er, eg)


def test_crop_rule_hand_computed():
    orig = gradient_image(1000, 800)
    # The original at 256 tokens: beta = sqrt(1000*800/200704) = 1.99649;
    # h = floor(800/1.99649/28)*28 = floor(14.31)*28 = 392, w = floor(1000/1.99649/28)*28 = floor(17.89)*28 = 476.
    _, thw = preprocess_image(orig, max_pixels=200704)
    display = display_size(thw)
    assert display == (476, 392)

    # bbox on the displayed original: x 119/476 = 0.25 .. 357/476 = 0.75, y 98/392 = 0.25 .. 294/392 = 0.75
    # -> original pixels (250, 200)-(750, 600), a 500x400 region.
    crop, region = crop_image(orig, (0, 0, 1, 1), display, [119, 98, 357, 294])
    assert region == pytest.approx((0.25, 0.25, 0.75, 0.75))
    # displayed px per original px: min(476/1000, 392/800) = min(0.476, 0.49) = 0.476;
    # scale = min(2*0.476, 1/0.5, 1/0.5) = 0.952 -> (500*0.952, 400*0.952) = (476, 380.8) -> (476, 381).
    # The region was displayed 238x196 px, so the crop is 2x that in x (476) and 2*0.476*400 in y.
    assert crop.size == (476, 381)
    check_corners(crop, (250, 200, 750, 600))

    # The crop as displayed: smart_resize(381, 476) under the crop budget = (392, 476): round(13.6)=14*28, 17*28.
    _, cthw = preprocess_image(crop, max_pixels=budget_per_crop())
    cdisplay = display_size(cthw)
    assert cdisplay == (476, 392)

    # A crop of the crop: the bottom-right quarter of its display, (238, 196)-(476, 392)
    # -> x 0.25 + 238/476*0.5 = 0.5 .. 0.25 + 0.5 = 0.75, y 0.25 + 196/392*0.5 = 0.5 .. 0.75
    # -> original pixels (500, 400)-(750, 600), 250x200: cut from the ORIGINAL, not from `crop`.
    crop2, region2 = crop_image(orig, region, cdisplay, [238, 196, 476, 392])
    assert region2 == pytest.approx((0.5, 0.5, 0.75, 0.75))
    # parent shows 500x400 original px at 476x392: s = min(0.952, 0.98) = 0.952;
    # scale = min(1.904, 4, 4) -> (250*1.904, 200*1.904) = (476, 380.8) -> (476, 381)
    assert crop2.size == (476, 381)
    # corner colours: top-left ~ original (500.26, 400.26) -> (R, G) ~ (125, 100);
    # bottom-right ~ (749.74, 599.74) -> (R, G) ~ (187.3, 149.8)
    a = np.asarray(crop2).astype(float)
    assert abs(a[0, 0, 0] - 125) <= 1.5 and abs(a[0, 0, 1] - 100) <= 1.5
    assert abs(a[-1, -1, 0] - 187.3) <= 1.5 and abs(a[-1, -1, 1] - 149.8) <= 1.5
    check_corners(crop2, (500, 400, 750, 600))

    # Away from the edges (LANCZOS support = 3 source px) the crop equals cut-then-resize of
    # the original's exact pixels, so it really is made of those pixels.
    ref = np.asarray(orig.crop((500, 400, 750, 600)).resize((476, 381), Image.Resampling.LANCZOS)).astype(int)
    got = np.asarray(crop2).astype(int)
    assert np.abs(ref[8:-8, 8:-8] - got[8:-8, 8:-8]).max() <= 1


def test_crop_of_crop_uses_subpixel_coordinates():
    orig = gradient_image(1000, 800)
    # A region not on pixel boundaries: displayed original at (476, 392), bbox (100, 50, 301, 211)
    # -> x 100/476*1000 = 210.08 .. 632.35, y 50/392*800 = 102.04 .. 430.61
    crop, region = crop_image(orig, (0, 0, 1, 1), (476, 392), [100, 50, 301, 211])
    box = (region[0] * 1000, region[1] * 800, region[2] * 1000, region[3] * 800)
    assert box == pytest.approx((100 / 476 * 1000, 50 / 392 * 800, 301 / 476 * 1000, 211 / 392 * 800))
    check_corners(crop, box)
    _, cthw = preprocess_image(crop, max_pixels=budget_per_crop())
    crop2, region2 = crop_image(orig, region, display_size(cthw), [10, 20, 100, 90])
    box2 = (region2[0] * 1000, region2[1] * 800, region2[2] * 1000, region2[3] * 800)
    cw, ch = display_size(cthw)
    assert box2 == pytest.approx((box[0] + 10 / cw * (box[2] - box[0]), box[1] + 20 / ch * (box[3] - box[1]),
                                  box[0] + 100 / cw * (box[2] - box[0]), box[1] + 90 / ch * (box[3] - box[1])))
    check_corners(crop2, box2)


def test_crop_caps():
    # Original 1000x800 at the Qwen default max_pixels is displayed a bit upscaled:
    # smart_resize(800, 1000) = (812, 1008), so s = min(1.008, 1.015) = 1.008.
    orig = gradient_image(1000, 800)
    _, thw = preprocess_image(orig)
    display = display_size(thw)
    assert display == (1008, 812)

    # 2x cap: a small region is cut at twice its displayed size. bbox 100x100 display px
    # -> 99.2 x 98.5 original px; scale = min(2.016, 1/0.0992, 1/0.1232) = 2.016 -> 200 x 198.6
    _, region = crop_image(orig, (0, 0, 1, 1), display, [0, 0, 100, 100])
    w, h = crop_size((1000, 800), (0, 0, 1, 1), display, region)
    assert (w, h) == (200, round(100 / 812 * 800 * 2.016))
    assert w <= 2 * 100 and h <= 2 * 100

    # original-size cap: the top-left quarter (500x400 px) at 2x its display (1008x812) would be
    # larger than the original image; scale = min(2.016, 1/0.5, 1/0.5) = 2 -> exactly 1000x800.
    crop, region = crop_image(orig, (0, 0, 1, 1), display, [0, 0, 504, 406])
    assert region == pytest.approx((0, 0, 0.5, 0.5))
    assert crop.size == (1000, 800)
    check_corners(crop, (0, 0, 500, 400))

    # the whole image: scale = min(2.016, 1, 1) = 1, i.e. the original pixels untouched
    crop, region = crop_image(orig, (0, 0, 1, 1), display, [0, 0, 1008, 812])
    assert region == (0, 0, 1, 1) and crop.size == (1000, 800)
    assert np.array_equal(np.asarray(crop), np.asarray(orig))

    # a crop of a crop is capped by the ORIGINAL's dimensions too
    crop, region = crop_image(orig, (0.5, 0.5, 1.0, 1.0), (1008, 812), [0, 0, 1008, 812])
    assert crop.size == (1000, 800)


def test_bad_bboxes_raise():
    disp = (476, 392)
    bad = [
        [-1, 0, 10, 10],  # out of range
        [0, 0, 477, 10],
        [0, 0, 10, 393],
        [10, 0, 5, 10],  # inverted
        [0, 10, 10, 5],
        [5, 0, 5, 10],  # degenerate
        [0, 7, 10, 7],
        [0, 0, 10],  # wrong length
        [0, 0, float("nan"), 10],
        [0, 0, "10", 10],
    ]
    orig = gradient_image(1000, 800)
    for bbox in bad:
        with pytest.raises(ValueError) as e:
            map_bbox((0, 0, 1, 1), disp, bbox)
        assert str(bbox[:2])[1:-1] in str(e.value) and "476x392" in str(e.value), str(e.value)
        with pytest.raises(ValueError):
            crop_image(orig, (0, 0, 1, 1), disp, bbox)
    # the edges themselves are fine
    assert map_bbox((0, 0, 1, 1), disp, [0, 0, 476, 392]) == (0, 0, 1, 1)


def test_too_thin_crop_raises():
    orig = gradient_image(1000, 800)
    # 1 display px wide, the full height: 2.1 x 1680 px -> aspect far above 200
    with pytest.raises(ValueError, match=r"bbox \[0, 0, 1, 392\]"):
        crop_image(orig, (0, 0, 1, 1), (476, 392), [0, 0, 1, 392])


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="junk.png"):
        load_image(junk)
    img = load_image(os.path.join(FIXTURES, FIXTURE_FILES[0]))
    assert img.mode == "RGB" and img.size == (422, 359)
