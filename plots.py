"""
Figures drawn with PIL alone (no matplotlib dependency): one line chart, used by grpo.py --plot
(the training curves of paper Figure 9, one panel per curve) and eval.py --sweep (score against
the visual-token budget, paper Table 3 / Figure 4), and the attention-map figure of eval.py
--attn-map (paper Figures 5/14). Its own file because two scripts draw with it, and scripts do
not import each other.
"""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def font(size):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def dashed(draw, p, q, fill, width, dash=8):
    (x0, y0), (x1, y1) = p, q
    n = max(1, int(math.hypot(x1 - x0, y1 - y0) // dash))
    for k in range(0, n, 2):
        a, b = k / n, min(1, (k + 1) / n)
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill, width)


def line_chart(img, box, series, title, xlabel="", ylabel="", reference=None, logx=False, percent=False, size=16):
    """Draw one line chart into the rectangle box = (x0, y0, x1, y1) of img (PIL RGB).

    series / reference: {label: {x: y}}; ours solid with dots, reference (e.g. the paper's)
    dashed with open dots. A legend at the right when there is more than one line.
    logx: x on a log2 axis with a tick at every x (token budgets double); otherwise linear with
    the first and last x. percent: y in points, ticks at multiples of 5 or 10 inside [0, 100];
    otherwise 5 ticks spanning the data with a 5% margin."""
    reference = reference or {}
    lines = [(k, v, False) for k, v in series.items()] + [(k, v, True) for k, v in reference.items()]
    pts = [(x, y) for _, s, _ in lines for x, y in s.items() if y is not None]
    if not pts:
        raise ValueError(f"{title}: nothing to plot")
    d = ImageDraw.Draw(img)
    f, fs = font(size), font(size - 3)
    bx0, by0, bx1, by1 = box
    legend = len(lines) > 1
    L, R, T, B = bx0 + 5 * size, bx1 - (15 * size if legend else 12), by0 + 2 * size, by1 - 2 * size - 6
    tx = (lambda x: math.log2(x)) if logx else (lambda x: x)  # noqa: E731
    xs = sorted({x for x, _ in pts})
    lo, hi = tx(xs[0]), tx(xs[-1])
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    ys = [y for _, y in pts]
    if percent:
        ylo, yhi = max(0, 5 * math.floor(min(ys) / 5 - 1)), min(100, 5 * math.ceil(max(ys) / 5 + 1))
        if yhi <= ylo:
            ylo, yhi = max(0, ylo - 5), ylo + 5
        step = 5 if yhi - ylo <= 50 else 10
        yticks = list(range(ylo, yhi + 1, step))
    else:
        ylo, yhi = min(ys), max(ys)
        ylo, yhi = (ylo - 0.5, yhi + 0.5) if yhi == ylo else (ylo - 0.05 * (yhi - ylo), yhi + 0.05 * (yhi - ylo))
        yticks = [ylo + t * (yhi - ylo) / 4 for t in range(5)]
    pad = 0.03 * (R - L)  # keep the first and last points off the axes
    px = lambda x: L + pad + (tx(x) - lo) / (hi - lo) * (R - L - 2 * pad)  # noqa: E731
    py = lambda y: B - (y - ylo) / (yhi - ylo) * (B - T)  # noqa: E731
    for y in yticks:  # horizontal grid + y ticks
        d.line([(L, py(y)), (R, py(y))], (225, 225, 225), 1)
        d.line([(L - 5, py(y)), (L, py(y))], "black", 1)
        d.text((L - 8, py(y)), f"{y}" if percent else f"{y:.3g}", "black", fs, anchor="rm")
    for x in (xs if logx else [xs[0], xs[-1]]):  # x ticks
        d.line([(px(x), B), (px(x), B + 5)], "black", 1)
        d.text((px(x), B + 8), f"{x:g}", "black", fs, anchor="ma")
    d.line([(L, T), (L, B), (R, B)], "black", 2)  # axes
    d.text(((L + R) / 2, by0 + size), title, "black", f, anchor="mm")
    if xlabel:
        d.text(((L + R) / 2, by1 - 4), xlabel, "black", f, anchor="ms")
    if ylabel:
        lab = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
        ImageDraw.Draw(lab).text((150, 12), ylabel, "black", f, anchor="mm")
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (bx0 + 8, int((T + B) / 2 - lab.height / 2)), lab)
    for n, (label, s, is_ref) in enumerate(lines):
        c = COLOURS[n % len(COLOURS)]
        xy = [(px(x), py(y)) for x, y in sorted(s.items()) if y is not None]
        for a, b in zip(xy, xy[1:]):
            dashed(d, a, b, c, 2) if is_ref else d.line([a, b], c, 3 if legend else 2)
        for x, y in (xy if legend or len(xy) == 1 else []):
            r = 3 if is_ref else 5
            d.ellipse([x - r, y - r, x + r, y + r], fill="white" if is_ref else c, outline=c, width=2)
        if legend:
            ly = T + 10 + 24 * n
            dashed(d, (R + 15, ly), (R + 45, ly), c, 2, dash=6) if is_ref else d.line([(R + 15, ly), (R + 45, ly)], c, 3)
            d.text((R + 52, ly), label, "black", fs, anchor="lm")


def plot_lines(series, path, title, xlabel, ylabel, reference=None):
    """One chart (960 x 600) of percentages against a log2 x axis, written to path."""
    img = Image.new("RGB", (960, 600), "white")
    line_chart(img, (0, 0, 960, 600), series, title, xlabel, ylabel, reference, logx=True, percent=True)
    img.save(path)
    return img


def plot_panels(panels, path, cols=4, panel=(360, 240)):
    """A grid of small charts, one per (title, {x: y}), linear axes, written to path."""
    pw, ph = panel
    img = Image.new("RGB", (cols * pw, -(-len(panels) // cols) * ph), "white")
    for n, (title, points) in enumerate(panels):
        ox, oy = (n % cols) * pw, (n // cols) * ph
        line_chart(img, (ox, oy, ox + pw, oy + ph), {title: points}, title, size=13)
    img.save(path)
    return img


# -----------------------------------------------------------------------------
# attention maps


def jet(v):
    """A jet-like colour ramp: v in [0, 1] (array) -> uint8 RGB, blue -> cyan -> green -> yellow -> red."""
    v = np.clip(np.asarray(v, dtype=np.float32), 0, 1)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where r, g, b peak
    rgb = np.clip(1.5 - np.abs(4 * (v - centres)), 0, 1)
    return (255 * rgb).astype(np.uint8)


def attention_figure(img, maps, titles, path, panel=560):
    """Panels side by side: the image with each map overlaid (jet, alpha 0.5), one colour
    scale for all panels so sharper attention shows as sharper; a colour bar below."""
    vmax = max(float(np.percentile(m, 99.5)) for m in maps) or 1.0
    vmin = min(float(m.min()) for m in maps)
    scale = panel / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    base = np.asarray(img.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    top, gap, bar = 40, 16, 50
    out = Image.new("RGB", (len(maps) * size[0] + (len(maps) + 1) * gap, top + size[1] + bar), "white")
    d = ImageDraw.Draw(out)
    f = font(15)
    for n, (m, title) in enumerate(zip(maps, titles)):
        heat = Image.fromarray(((m - vmin) / max(vmax - vmin, 1e-12)).astype(np.float32), mode="F")
        heat = np.asarray(heat.resize(size, Image.Resampling.BILINEAR))
        blend = 0.5 * base + 0.5 * jet(heat).astype(np.float32)
        x0 = gap + n * (size[0] + gap)
        out.paste(Image.fromarray(blend.clip(0, 255).astype(np.uint8)), (x0, top))
        d.text((x0 + size[0] / 2, top / 2), title if len(title) <= 70 else title[:67] + "...", "black", f, anchor="mm")
    ramp = jet(np.linspace(0, 1, 256)[None, :].repeat(12, 0))
    bw = min(300, out.width - 2 * gap)
    bx, by = (out.width - bw) // 2, top + size[1] + 12
    out.paste(Image.fromarray(ramp).resize((bw, 12)), (bx, by))
    d.text((bx - 6, by + 6), "low", "black", font(13), anchor="rm")
    d.text((bx + bw + 6, by + 6), "high", "black", font(13), anchor="lm")
    d.text((out.width / 2, by + 26), "attention received, last vision layer, mean over heads", "black", font(12),
           anchor="mt")
    out.save(path)
    return out
