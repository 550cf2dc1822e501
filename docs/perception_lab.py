"""
The perception lab: can a tiny ViLaVT learn to see the zoom world? (README, "Learning to look")

    python docs/perception_lab.py --task dense --freeze-vision --world '{"card_border": 12, "card_size": [80, 56]}'

A research instrument, not a stage of the pipeline: it trains a random tiny ViLaVT (model.tiny_config)
in-process on ONE single-step perception task made from zoom-world scenes, and prints held-out
accuracy as it goes. It exists because the demo's trajectory SFT mixes a dozen skills, and when the
demo fails one cannot tell which skill is missing; here each skill is alone, the batch is padded
(16 samples per forward), a frozen vision tower's features are computed once, and a run takes
minutes. Every record is rendered by data.render_sample exactly as sft.py renders it (the image is
handed over in memory instead of read from a file). Accuracy is teacher-forced: the candidate
answer (of 2-7) whose tokens the model finds most likely, as zoom_world's probes score them.

Tasks (--task): "present" (is there a red card? yes/no), "present_text" (the same, with the cards'
colours also listed in the question: the lookup without vision), "caption" (the colours of all
cards, in a fixed order: a read-out with no question to follow), "dense" (each cell's colour, cells
in reading order), "ground" (where is the red card? one of 4 cells), "cotground" (the dense caption,
then the cell of the asked card: grounding by looking the colour up in its own caption), "read"
(count the dots on the red card in the gold zoom, 1-6), "ground1" (where is the card, the asked
card alone in the scene), and mixes: "mix" trains caption + ground, "cot" dense + cotground,
"curriculum" ground1 + ground (each evaluates the second).
Features (what the LM gets in place of the vision tower's): the tower itself (default; trained
unless --freeze-vision), or --oracle: hand-made features, per token the sum of a random vector per
card colour covering it plus a background vector (--oracle-pos adds one of 4 random vectors per
image quadrant), each vector N(0, 0.02^2) per channel like the text embeddings.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import zoom_scenes as zs  # noqa: E402
import zoom_world as zw  # noqa: E402
from data import ENCODER_KEYS, Budget, ChatTokenizer, Context, render_sample  # noqa: E402
from model import ViLaVT, tiny_config  # noqa: E402

ap = argparse.ArgumentParser(description="train a tiny ViLaVT on one perception task; print held-out accuracy")
ap.add_argument("--task", default="ground", help="present, present_text, caption, dense, ground, cotground, read, "
                                                 "ground1, mix (caption + ground), cot (dense + cotground), "
                                                 "curriculum (ground1 + ground)")
ap.add_argument("--world", default="{}", help="ZoomWorldConfig fields as JSON, e.g. '{\"card_border\": 12}'")
ap.add_argument("--n-train", type=int, default=8000)
ap.add_argument("--n-eval", type=int, default=200)
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW lr: 20 warm-up steps, then cosine to 0")
ap.add_argument("--vision-lr", type=float, help="the vision tower's lr (default: --lr)")
ap.add_argument("--freeze-vision", action="store_true", help="the tower stays at its random init")
ap.add_argument("--train-query-layers", action="store_true", help="with --freeze-vision: the query-aware layers "
                                                                  "and the merger train (at --vision-lr)")
ap.add_argument("--question-inquiry", action="store_true", help="the question is the image's inquiry "
                                                                "(data.Initial: section 4.4's single pass)")
ap.add_argument("--rope-theta", type=float, help="the LM's rope_theta (tiny_config: 1e6)")
ap.add_argument("--merger-scale", type=float, default=1.0, help="multiply the merger's last layer at init")
ap.add_argument("--question-first", action="store_true", help="the question before the image")
ap.add_argument("--ramp", type=int, default=0, help="the world's colour ramp (ZoomWorldConfig.ramp, which --world "
                                                    "can also set): red grows left to right, blue top to bottom")
ap.add_argument("--colour-first", action="store_true", help="dense captions name the colour, then the cell")
ap.add_argument("--oracle", action="store_true", help="hand-made features instead of the tower's (docstring)")
ap.add_argument("--oracle-pos", action="store_true", help="oracle features also say the quadrant")
ap.add_argument("--eval-every", type=int, default=250)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(args.threads)
print(vars(args), flush=True)

# -----------------------------------------------------------------------------
# the tasks

tok_dir = tempfile.mkdtemp()
zw.build_tokenizer(tok_dir)
tok = AutoTokenizer.from_pretrained(tok_dir)
ct = ChatTokenizer(tok, tok)
# The world every row of the README's lab table was measured on: the zoom world's defaults before
# the demo's own changed (commit b5e3d5a: bigger cards and dots, a ramp, one card), so that the
# rows' commands still draw those scenes; --world overrides any field. The tiny tokenizer's corpus
# (the world's sentences) has changed since, so the model's init does too, and a rerun's figures
# are not the table's to the digit (row 23's command at step 0: 27.0% now, 26.5% then).
LAB_WORLD = dict(card_size=(64, 40), card_border=6, dot_size=8, dot_grid=(4, 2), n_cards=(2, 4), ramp=0)
# --ramp is the world's own ramp, drawn over the original before any crop as the demo's scenes are
# (until commit 75b2e1d the lab drew its own over each record's image, so a crop of the `read` task
# carried a whole ramp of its own: the README table's rows with --ramp 40 ran so)
cfgw = zw.ZoomWorldConfig(**{**LAB_WORLD, "ramp": args.ramp, **{k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in json.loads(args.world).items()}})
Wd, Hd, r = zs.geometry(cfgw)
assert cfgw.grid == (2, 2), "the lab's tasks name the 4 cells of a 2x2 grid"
CELLS = ["in the top left", "in the top right", "in the bottom left", "in the bottom right"]
COLORS = list(zs.COLORS)


def caption_text(cell):
    """Cells in reading order. --colour-first writes "red: top left." (a colour, then where it is:
    looking a colour up in it copies what follows the match, as an induction head does),
    else "top left: red."."""
    if args.colour_first:
        return " ".join(f"{cell.get(p, 'none')}: {p[7:]}." for p in CELLS)
    return " ".join(f"{p[7:]}: {cell.get(p, 'none')}." for p in CELLS)


def dense_caption(cards):
    cell = {zw._place(cfgw, c["box"]): c["color"] for c in cards}
    return cell, caption_text(cell)


def make_task(task, rng):
    """(image, question, candidate thinks, index of the gold one, cards)"""
    color = COLORS[int(rng.integers(len(COLORS)))]
    if task in ("present", "present_text"):
        has = bool(rng.integers(2))
        cards = zs.scene(rng, cfgw, r, "dots", [color] if has else [], {})
        while not has and any(c["color"] == color for c in cards):
            cards = zs.scene(rng, cfgw, r, "dots", [], {})
        q = f"Is there a {color} card in the image?"
        if task == "present_text":
            q = "Cards: " + ", ".join(c["color"] for c in cards) + ". " + q
        cands, gold = [f"The image has a {color} card: yes.", f"The image has a {color} card: no."], int(not has)
    elif task == "caption":
        cards = zs.scene(rng, cfgw, r, "dots", [color], {})
        names = [c for c in COLORS if any(k["color"] == c for k in cards)]
        absent = [c for c in COLORS if c not in names]
        alts = [[c for c in COLORS if c in names[:j % len(names)] + [absent[j]] + names[j % len(names) + 1:]]
                for j in range(3)]  # one colour swapped for an absent one
        q, cands, gold = "Which colors are the cards?", ["The cards are " + ", ".join(n) + "." for n in [names] + alts], 0
    elif task == "dense":
        cards = zs.scene(rng, cfgw, r, "dots", [color], {})
        cell, cap = dense_caption(cards)
        cands = [cap]
        for j in range(3):  # one cell wrong
            alt, p = dict(cell), CELLS[(j + int(rng.integers(4))) % 4]
            others = [c for c in COLORS + ["none"] if c != cell.get(p, "none")]
            alt[p] = others[int(rng.integers(len(others)))]
            cands.append(caption_text(alt))
        q, gold = "Which color is in each cell?", 0
    elif task in ("ground", "cotground", "ground1"):
        cards = zs.scene(rng, cfgw, r, "dots", [color], {})
        if task == "ground1":  # the asked card alone: where-is needs no colour match, only a position read-out
            cards = [c for c in cards if c["color"] == color]
        cell, cap = dense_caption(cards)
        pre = cap + " " if task == "cotground" else ""
        q, cands = f"Where is the {color} card?", [f"{pre}The {color} card is {p} of image 0." for p in CELLS]
        gold = CELLS.index(next(p for p, c in cell.items() if c == color))
    elif task == "read":
        cards = zs.scene(rng, cfgw, r, "dots", [color], {})
        t = next(c for c in cards if c["color"] == color)
        img = zs.cell_crop(cfgw, zs.render(rng, cfgw, r, cards), t["box"])  # the gold zoom
        values = zs.mark_values(cfgw, "dots")
        cands = [f"The {color} card has {v} dots." for v in values]
        return img, f"How many dots are on the {color} card?", cands, values.index(t["value"]), cards
    else:
        raise SystemExit(f"unknown --task {task}")
    return zs.render(rng, cfgw, r, cards), q, cands, gold, cards


def make(i, split):
    rng = np.random.default_rng([args.seed, split, i])
    mix = {"mix": ("caption", "ground"), "cot": ("dense", "cotground"), "curriculum": ("ground1", "ground")}.get(args.task)
    if mix is None:
        return make_task(args.task, rng)
    return make_task(mix[1] if split == 1 or i % 2 else mix[0], rng)  # eval: the second task only


def render(img, q, think):
    """A one-step record rendered by data.render_sample, the image given in memory. The prompt is
    short (a question and the image), so that a run takes minutes."""
    prompt = f"Question: {q}\n<image>" if args.question_first else f"<image>{q}"
    rec = {"images": ["in memory"], "question": q, "system": "Look.", "prompt": prompt,
           "steps": [{"think": think, "answer": "done"}], "max_pixels": cfgw.display_max_pixels}
    with mock.patch.object(data, "load_originals", lambda *a: [img]):
        s = render_sample(rec, "lab", "/", ct, Budget(), data.Initial(inquiry=args.question_inquiry))
    return {k: v for k, v in s.items() if k not in ("context", "text")}


# -----------------------------------------------------------------------------
# the model

torch.manual_seed(args.seed)
cfg = tiny_config(len(tok), tok.convert_tokens_to_ids("<|image_pad|>"))
if args.rope_theta:
    cfg.lm.rope_theta = args.rope_theta
model = ViLaVT(cfg)
model.init_weights()
with torch.no_grad():
    model.visual.merger.mlp[2].weight.mul_(args.merger_scale)
for p in model.text_encoder.parameters():
    p.requires_grad_(False)
vis = [p for n, p in model.named_parameters() if n.startswith("visual.")]
query_blocks = tuple(f"visual.blocks.{i}." for i in cfg.vision.query_layers) + ("visual.merger.",)
for n, p in model.named_parameters():
    if n.startswith("visual."):
        p.requires_grad_(not args.oracle and (not args.freeze_vision or args.train_query_layers and
                                              n.startswith(query_blocks)))
vis = [p for p in vis if p.requires_grad]
rest = [p for p in model.parameters() if p.requires_grad and not any(p is v for v in vis)]
groups = [dict(params=rest, lr=args.lr, peak=args.lr)]
if vis:
    vlr = args.vision_lr if args.vision_lr is not None else args.lr
    groups.append(dict(params=vis, lr=vlr, peak=vlr))
opt = torch.optim.AdamW(groups, weight_decay=0.0)

g = torch.Generator().manual_seed(1)
colour_vec = torch.randn(len(COLORS) + 1, cfg.lm.hidden_size, generator=g) * 0.02  # the last one: background
quadrant_vec = torch.randn(4, cfg.lm.hidden_size, generator=g) * 0.02


def oracle_features(cards, n=6, px=56):
    """(36, C) hand-made features of a 336x336 scene: token (row, col) covers px x px original pixels."""
    f = colour_vec[-1].repeat(n * n, 1)
    for ty in range(n):
        for tx in range(n):
            if args.oracle_pos:
                f[ty * n + tx] += quadrant_vec[(ty // 3) * 2 + tx // 3]
            for c in cards:
                x1, y1, x2, y2 = c["box"]
                if x1 < (tx + 1) * px and x2 > tx * px and y1 < (ty + 1) * px and y2 > ty * px:
                    f[ty * n + tx] += colour_vec[COLORS.index(c["color"])]
    return f


def features(s, cards):
    """Fixed features replace the pixels when nothing in the tower trains: computed once."""
    if args.oracle:
        s["features"] = oracle_features(cards)
    elif args.freeze_vision and not args.train_query_layers:
        with torch.no_grad():
            s["features"] = model.encode_images(s["pixel_values"], s["grid_thw"])
    if "features" in s:
        s["pixel_values"] = None
    return s


t0 = time.time()
train = [features(render(img, q, cands[gold]), cards) for img, q, cands, gold, cards in
         (make(i, 0) for i in range(args.n_train))]
evals = [([features(render(img, q, c), cards) for c in cands], gold) for img, q, cands, gold, cards in
         (make(i, 1) for i in range(args.n_eval))]
print(f"data {time.time() - t0:.0f}s; {len(train[0]['input_ids'])} tokens per sample", flush=True)


def logprobs(items):
    """(B, T) teacher-forced log-probs at the supervised tokens of a padded batch; 0 elsewhere."""
    T = max(len(s["input_ids"]) for s in items)
    ids, targets = torch.zeros(len(items), T, dtype=torch.long), torch.full((len(items), T), -100)
    for b, s in enumerate(items):
        n = len(s["input_ids"])
        ids[b, :n] = s["input_ids"]
        targets[b, :n - 1] = s["labels"][1:]
    if items[0]["pixel_values"] is None:
        h = model.hidden_states(ids, grid_thw=torch.cat([s["grid_thw"] for s in items]),
                                image_embeds=torch.cat([s["features"] for s in items]))
    else:
        enc = Context.merge_encoder_inputs([{k: s[k] for k in ENCODER_KEYS} for s in items])
        h = model.hidden_states(ids, **enc)
    return model.token_logprobs(h, targets)


def visual_stats():
    """The issue's instrument: the features' variation across the tokens of one image, and their mean magnitude."""
    if train[0]["pixel_values"] is None:
        return ""
    with torch.no_grad():
        f = model.encode_images(train[0]["pixel_values"], train[0]["grid_thw"])
    return f" | visual tokens: std over tokens {f.std(0).mean():.4f}, |mean| {f.mean(0).abs().mean():.4f}"


def accuracy():
    model.eval()
    right = 0
    with torch.no_grad():
        for cands, gold in evals:
            right += int(logprobs(cands).sum(1).argmax()) == gold
    model.train()
    return 100 * right / len(evals)


# -----------------------------------------------------------------------------
# training

print(f"step 0 | held-out accuracy {accuracy():.1f}%{visual_stats()}", flush=True)
order, pos = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist(), 0
t0 = time.time()
step = 0
while step < args.steps:
    items = []
    for _ in range(args.batch):
        if pos >= len(order):
            order, pos = torch.randperm(len(train)).tolist(), 0
        items.append(train[order[pos]])
        pos += 1
    for grp in opt.param_groups:
        grp["lr"] = grp["peak"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    lp = logprobs(items)
    n = sum(int((s["labels"][1:] != -100).sum()) for s in items)
    loss = -lp.sum() / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step += 1
    if step % args.eval_every == 0 or step >= args.steps:
        print(f"step {step} | loss {loss.item():.4f} | held-out accuracy {accuracy():.1f}%{visual_stats()} | "
              f"{time.time() - t0:.0f}s", flush=True)
