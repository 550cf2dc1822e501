"""
The zoom world's pictures: the grid of cells, the cards and their marks, the clutter and the
colour ramp, and the gold zoom of a card, all in original-file pixels (cfg: a
zoom_world.ZoomWorldConfig).

    geometry(cfg)            (display W, H, r): the originals' display size and scale-down r, the
                             config checked
    scene(rng, cfg, r, ...)  the cards of one image (colour, mark value, box)
    render(rng, cfg, r, cards)  its image
    cell, cells_bbox, cell_crop, normalised, crop_display, in_display: where a card is, in cells,
                             display px, the gold crop, normalised coordinates

Its own file because zoom_world.py holds the task's records, sentences and presets and the
driver that runs the scripts; this file draws, and knows no record, sentence or script. Why the
marks need a zoom (the physics of the checkerboard texture) is told where the task is designed,
at the top of zoom_world.py's task section.
"""

import functools
import math

import numpy as np
from PIL import Image

from pixels import FACTOR, MIN_PIXELS, crop_size, map_bbox, smart_resize

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 100, 220), "yellow": (240, 200, 20),
             "purple": (148, 70, 189), "orange": (250, 130, 20), "cyan": (20, 190, 205)}
FONT = {  # 3x5 digits
    0: ("###", "#.#", "#.#", "#.#", "###"), 1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"), 3: ("###", "..#", "###", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"), 5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"), 7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"), 9: ("###", "#.#", "###", "..#", "###")}

def geometry(cfg):
    """(display W, H, r) for the config's originals; r = original px per display px."""
    OW, OH = cfg.canvas_size
    Hd, Wd = smart_resize(OH, OW, FACTOR, MIN_PIXELS, cfg.display_max_pixels)
    r = OW // Wd
    if OW != r * Wd or OH != r * Hd or r < 2 or r % 2:
        raise ValueError(f"zoom world: canvas {OW}x{OH} displays at {Wd}x{Hd} under max_pixels="
                         f"{cfg.display_max_pixels}; need an exact even scale-down (e.g. 336x336 -> 168x168)")
    cols, rows = cfg.grid
    if not {cols, rows} <= {2, 3} or (cfg.share_crop_of_crop > 0 and (cols, rows) != (3, 3)):
        raise ValueError(f"zoom world: grid {cfg.grid}: 2 or 3 cells a side, 3x3 for crop-of-crop samples")
    if Wd % cols or Hd % rows:
        raise ValueError(f"zoom world: the {Wd}x{Hd} display does not split into a {cols}x{rows} grid of whole pixels")
    for big in (False, True):
        w, h = card_dims(cfg, r, big)
        if w + 2 * cfg.cell_margin > OW // cols or h + 2 * cfg.cell_margin > OH // rows:
            raise ValueError(f"zoom world: a {w}x{h} card plus cell_margin does not fit a cell of "
                             f"{OW // cols}x{OH // rows}")
    for name in ("dot_size", "digit_cell"):
        if getattr(cfg, name) % r:
            raise ValueError(f"zoom world: {name}={getattr(cfg, name)} must be a multiple of r={r}")
    if sum(cfg.ink_levels) % 2:
        raise ValueError(f"zoom world: ink_levels {cfg.ink_levels} need an integer mean")
    if cfg.dot_count[1] > cfg.dot_grid[0] * cfg.dot_grid[1]:
        raise ValueError(f"zoom world: dot_count {cfg.dot_count} exceeds the {cfg.dot_grid} dot positions")
    if cfg.n_cards[1] > min(len(COLORS), cols * rows):
        raise ValueError(f"zoom world: at most {min(len(COLORS), cols * rows)} cards per image "
                         f"(one per colour and per cell)")
    return Wd, Hd, r

def card_dims(cfg, r, big):
    w, h = cfg.card_size
    if big:
        w, h = w * cfg.big_card_scale, h * cfg.big_card_scale
    return int(math.ceil(w / r) * r), int(math.ceil(h / r) * r)


def cell(cfg, box):
    """(column, row) of the grid cell holding a card box (original px)."""
    cw, ch = cfg.canvas_size[0] // cfg.grid[0], cfg.canvas_size[1] // cfg.grid[1]
    return int((box[0] + box[2]) / 2 // cw), int((box[1] + box[3]) / 2 // ch)


def normalised(cfg, box):
    """A box in original px -> normalised to the original (the records' target_boxes and scene)."""
    OW, OH = cfg.canvas_size
    return [box[0] / OW, box[1] / OH, box[2] / OW, box[3] / OH]


def cell_crop(cfg, img, box):
    """The gold zoom of a card at `box` (original px): its grid cell cut from the original image."""
    c, k = cell(cfg, box)
    cw, ch = cfg.canvas_size[0] // cfg.grid[0], cfg.canvas_size[1] // cfg.grid[1]
    return img.crop((c * cw, k * ch, (c + 1) * cw, (k + 1) * ch))


def cells_bbox(cfg, geom, c1, c2=None):
    """The display bbox [x1, y1, x2, y2] of the grid cells from (col, row) c1 to c2 (inclusive)."""
    Wd, Hd, _ = geom
    cw, ch = Wd // cfg.grid[0], Hd // cfg.grid[1]
    c2 = c1 if c2 is None else c2
    return [c1[0] * cw, c1[1] * ch, (c2[0] + 1) * cw, (c2[1] + 1) * ch]


def layout(rng, cfg, r, dims):
    """Card boxes (x1, y1, x2, y2) for the given dims: distinct random cells, a random spot
    (multiples of r) inside each, at least cell_margin from the cell's edges."""
    cols, rows = cfg.grid
    cw, ch = cfg.canvas_size[0] // cols, cfg.canvas_size[1] // rows
    boxes = []
    for k, (w, h) in zip(rng.permutation(cols * rows)[:len(dims)], dims):
        x = (k % cols) * cw + int(rng.integers(cfg.cell_margin // r, (cw - w - cfg.cell_margin) // r + 1)) * r
        y = (k // cols) * ch + int(rng.integers(cfg.cell_margin // r, (ch - h - cfg.cell_margin) // r + 1)) * r
        boxes.append((x, y, x + w, y + h))
    return boxes


def mark_mask(cfg, r, kind, value, slots, label):
    """Boolean mask (H, W) over the label box (lx1, ly1, lx2, ly2) of the mark's texture cells."""
    lx1, ly1, lx2, ly2 = label
    mask = np.zeros((ly2 - ly1, lx2 - lx1), bool)
    if kind == "dots":
        cols, rows = cfg.dot_grid
        s, g = cfg.dot_size, cfg.dot_gap
        x0 = ((lx2 - lx1) - (cols * s + (cols - 1) * g)) // 2 // r * r
        y0 = ((ly2 - ly1) - (rows * s + (rows - 1) * g)) // 2 // r * r
        for k in slots:
            x, y = x0 + (k % cols) * (s + g), y0 + (k // cols) * (s + g)
            mask[y:y + s, x:x + s] = True
    else:
        c = cfg.digit_cell
        x0 = ((lx2 - lx1) - 3 * c) // 2 // r * r
        y0 = ((ly2 - ly1) - 5 * c) // 2 // r * r
        for i, row in enumerate(FONT[value]):
            for j, ch in enumerate(row):
                if ch == "#":
                    mask[y0 + i * c:y0 + (i + 1) * c, x0 + j * c:x0 + (j + 1) * c] = True
    return mask


@functools.lru_cache(maxsize=4)
def checker(W, H, cell, lo, hi):
    """(H, W) uint8 checkerboard of `cell`-px squares, levels lo/hi, lo at (0, 0); cached, read-only."""
    yy, xx = np.indices((H, W))
    a = np.where((yy // cell + xx // cell) % 2 == 0, lo, hi).astype(np.uint8)
    a.flags.writeable = False
    return a


def render(rng, cfg, r, cards):
    """The image (PIL RGB) of one scene: background, clutter, then the cards with their marks."""
    from PIL import ImageDraw
    OW, OH = cfg.canvas_size
    base = int(rng.integers(170, 216))
    tint = rng.integers(-10, 11, 3)
    img = Image.new("RGB", (OW, OH), tuple(int(v) for v in np.clip(base + tint, 0, 255)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(cfg.n_clutter[0], cfg.n_clutter[1] + 1))):
        grey = base + int(rng.integers(-45, 46))
        col = tuple(min(255, max(0, grey + int(v))) for v in rng.integers(-12, 13, 3))  # muted: never a card colour
        w, h = (int(v) for v in rng.integers(cfg.clutter_size[0], cfg.clutter_size[1] + 1, 2))
        x, y = int(rng.integers(-w // 2, OW)), int(rng.integers(-h // 2, OH))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle([x, y, x + w, y + h], fill=col)
        elif shape == 1:
            draw.ellipse([x, y, x + w, y + h], fill=col)
        else:
            draw.line([x, y, x + w, y + h * int(rng.choice([-1, 1]))], fill=col, width=int(rng.integers(1, 4)))
    a = np.array(img)
    lo, hi = cfg.ink_levels
    texture = checker(OW, OH, r // 2, lo, hi)
    b = cfg.card_border
    for card in cards:
        x1, y1, x2, y2 = card["box"]
        a[y1:y2, x1:x2] = COLORS[card["color"]]
        label = (x1 + b, y1 + b, x2 - b, y2 - b)
        a[label[1]:label[3], label[0]:label[2]] = (lo + hi) // 2
        m = mark_mask(cfg, r, card["kind"], card["value"], card.get("slots", ()), label)
        sub = a[label[1]:label[3], label[0]:label[2]]
        sub[m] = lo if cfg.solid_marks else texture[label[1]:label[3], label[0]:label[2]][m][:, None]
    if cfg.ramp:
        a = a.astype(np.int16)
        a[..., 0] += np.linspace(-cfg.ramp, cfg.ramp, OW).round().astype(np.int16)[None, :]
        a[..., 2] += np.linspace(-cfg.ramp, cfg.ramp, OH).round().astype(np.int16)[:, None]
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def scene(rng, cfg, r, kind, colors_needed, values, big=None):
    """Cards of one image: the colours in colors_needed carry the given values (mark values),
    plus distractors with random colours and values. big: colour of the one large card
    (None: a random card is large with probability big_card_share). Returns the card list."""
    n = max(len(colors_needed), int(rng.integers(cfg.n_cards[0], cfg.n_cards[1] + 1)))
    others = [c for c in COLORS if c not in colors_needed]
    colors = list(colors_needed) + [others[i] for i in rng.permutation(len(others))[:n - len(colors_needed)]]
    if big is None and rng.random() < cfg.big_card_share:
        big = colors[int(rng.integers(len(colors)))]
    cards = []
    for c in colors:
        v = values.get(c)
        if v is None:
            lo, hi = cfg.dot_count if kind == "dots" else (1, 9)
            v = int(rng.integers(lo, hi + 1))
        card = {"color": c, "kind": kind, "value": v, "big": c == big}
        if kind == "dots":
            card["slots"] = sorted(int(s) for s in rng.permutation(cfg.dot_grid[0] * cfg.dot_grid[1])[:v])
        cards.append(card)
    boxes = layout(rng, cfg, r, [card_dims(cfg, r, c["big"]) for c in cards])
    for card, box in zip(cards, boxes):  # cells are random already
        card["box"] = box
    return cards


def crop_display(orig_size, parent_region, parent_display, bbox, budget):
    """(region, display size) of the crop a tool call would make: crop_size then smart_resize,
    exactly as Context.zoom computes it."""
    region = map_bbox(parent_region, parent_display, bbox)
    w, h = crop_size(orig_size, parent_region, parent_display, region)
    H, W = smart_resize(h, w, FACTOR, budget.min_pixels, budget.for_crops())
    return region, (W, H)


def in_display(box, region, display):
    """A box normalised in the original -> float box in the display px of `region`."""
    rx1, ry1, rx2, ry2 = region
    W, H = display
    return ((box[0] - rx1) / (rx2 - rx1) * W, (box[1] - ry1) / (ry2 - ry1) * H,
            (box[2] - rx1) / (rx2 - rx1) * W, (box[3] - ry1) / (ry2 - ry1) * H)


def mark_values(cfg, kind):
    """The values a card's mark can take: its dot count, or a digit."""
    return list(range(cfg.dot_count[0], cfg.dot_count[1] + 1)) if kind == "dots" else list(range(1, 10))

