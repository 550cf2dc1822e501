"""
The zoom world: the CPU demo of the whole method, as a synthetic task and a driver.

    python zoom_world.py              # data, tiny bases, perception, SFT, GRPO, eval -> out/demo/results.md
    python zoom_world.py --smoke      # the same sequence in miniature under out/smoke/ (CI, ~1 min)

The task writes images and gold "chatting with images" trajectories in the project's record
schema, answerable only by zooming in, and the perception records that come first (a base that can
see: where the asked card is, and its dots on a zoom). The driver runs the pipeline as a user types
it (`python sft.py --model ... --data ...`, then grpo.py, eval.py), printing each command first. The
scripts know nothing of this file: they see an HF model folder and a JSONL file, as at 7B. This file
owns the task's data, its tiny tokenizer and base models and the sizes of every stage (PRESETS);
zoom_scenes.py draws its images, zoom_metrics.py holds its instruments (the results table, the
probes); zoom_figure4.py is the encoder's own experiment on the same cards. Folders under out/
(out/smoke/ with --smoke), each stage starting from the previous one's `latest`:

    zoom/  tiny-base/ (stock)  tiny-embedder/  look/  read/  sft[-vanilla]/  grpo[-vanilla]/
    logs/ (perception.log; vilavt.log, vanilla.log: the two pipelines from `read` on run side by side;
           each script's output)
    demo/ (<row>.jsonl, results.json, .md, probes.json)

Resumable: a stage whose output is complete and newer than its input is skipped, a training run
cut short continues with --resume, an output older than its input is redone.
"""

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer  # the tokenizer class only, no modeling code

import rollout  # its checkpoint loader
from data import (ANSWER_FORMAT, CONTINUE_NOTE, DIRECT_INSTRUCTIONS, FINAL_NOTE, IMAGE, PLAIN_SYSTEM, SYSTEM_PROMPT,
                  TOOL_FORMAT, Budget, format_question, observation_parts, prompt_parts)
from tiny_tokenizer import train_tokenizer
from eval import load_bench, read_results, results_files
from model import ViLaVT, atomic_write, read_json, tiny_config
import zoom_scenes as zs  # the pictures
from zoom_scenes import COLORS, mark_values
from training import latest_checkpoint  # the scripts' checkpoint layout

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# the tiny tokenizer and the tiny base models


def tokenizer_corpus():
    """build_tokenizer's text: every fixed prompt, one rendered prompt and observation, the zoom
    world's sentences with each colour, place and number, and the printable ASCII characters."""
    texts = [SYSTEM_PROMPT, SYSTEM, PLAIN_SYSTEM, DIRECT_INSTRUCTIONS, TOOL_FORMAT, ANSWER_FORMAT,
             CONTINUE_NOTE, FINAL_NOTE]
    texts += [p for p in prompt_parts([(224, 224), (224, 224)], "How many dots are on the red card?")
              + observation_parts(2, [(84, 56)]) if p is not IMAGE]
    texts += [f"The index of the provided image is {i}.\nThe index of the zoom-in image is {i} "
              f"(width: {28 * i}, height: {56 * i}).\n" for i in range(10)]
    texts += world_texts()
    texts.append("0123456789 " + "".join(chr(c) for c in range(33, 127)) + " \n")
    return texts


def build_tokenizer(out_dir):
    """The demo's tokenizer (about 1000 tokens, Qwen's special tokens; tiny_tokenizer.train_tokenizer),
    saved in out_dir; the tests use it too."""
    return train_tokenizer(out_dir, tokenizer_corpus())


def build_tiny_base(out_dir, seed=0, vanilla=False):
    """A random tiny ViLaVT (model.tiny_config) saved as an HF folder, the tiny tokenizer as its LM
    and inquiry (query_tokenizer/) tokenizers, built in a temp dir renamed into place; the scripts
    load it like any checkpoint. vanilla: its stock Qwen2.5-VL twin (no inquiry path)."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tokenizer(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)  # as every later stage loads it
    torch.manual_seed(seed)
    model = ViLaVT(tiny_config(len(tok), tok.convert_tokens_to_ids("<|image_pad|>"), vanilla))
    model.init_weights()
    model.save_pretrained(tmp)
    if not vanilla:
        tok.save_pretrained(os.path.join(tmp, "query_tokenizer"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def build_tiny_embedder(out_dir, seed=1):
    """The tiny ViLaVT's random inquiry encoder saved as a Qwen3-Embedding folder (a Qwen3Model's
    config.json and keys, the tiny tokenizer), for `sft.py --embedder`: the demo turns its stock
    base into ViLaVT as a 7B user turns Qwen2.5-VL-7B into it (README)."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tokenizer(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    model = ViLaVT(tiny_config(len(tok), tok.convert_tokens_to_ids("<|image_pad|>")))
    model.init_weights()  # ViLaVT's init choices; the text encoder's part is kept
    save_file({k: v.contiguous() for k, v in model.text_encoder.state_dict().items()},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    atomic_write(os.path.join(tmp, "config.json"), json.dumps(model.cfg.inquiry.raw, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


# -----------------------------------------------------------------------------
# zoom world: a synthetic task whose answers need a zoom (paper App. A.2/A.3 in miniature)
#
# Coloured cards on a cluttered background; each card's grey label bears a mark: a few dots
# (count them) or one digit (read it). The scene is generated first and the gold trajectory
# is written from that knowledge (the paper's knowledge-first synthesis): the think names
# what is looked for and where, the tool call's bbox covers the target card, the query names
# it, the last step answers.
#
# Why the mark needs a zoom (the physics). Originals are displayed at exactly 1/r of their
# size (default 336x336 -> 168x168, r = 2, 36 visual tokens). A mark is a checkerboard texture
# (cells of r/2 original px, levels ink_levels) on a label of flat grey equal to its mean, so
# mark and bare label differ only in a pattern whose period is one display pixel, which the
# antialiased resize to the display cancels: the label shows as flat grey whatever the mark,
# up to a few grey levels at mark corners (tests/test_zoom_world.py measures <= 4 of 255).
# A zoom is cut at 2x the displayed scale (crop rule), so the texture's period becomes 2 crop
# px, the finest a pixel grid holds: the marks (12 px dots by default, a 12x20 px digit at r = 2) show
# at full contrast in the crop, and at 4 px per period in a crop of a crop.
# Visible at the display: the cards, their colours, sizes and number. Questions about those
# are the text-only share (App. A.3): a single answer step, no tool call.
# Where the cards are. Each image is cut into a grid of cells (default 2x2, the four corner
# phrases; 3x3 gives all nine), a card sits at a random spot inside one cell, and the gold
# bbox is the whole cell (84x84 display px by default: a 168x168 crop, 36 tokens, that
# smart_resize leaves alone). Locating the card is a choice among a few cells, named in the
# think before the bbox is written: a model of a few million parameters trained for minutes
# can map a phrase to a box (with free-form boxes our first tiny runs wrote degenerate ones).
# A bbox off the grid still works if it covers the card: its crop is resampled by
# smart_resize, which beats the 2-px texture into a moire of lower but still
# large contrast (test: >= 40 of 255).


@dataclass
class ZoomWorldConfig:
    """Every knob of the zoom world. Sizes in original-file pixels unless said otherwise."""
    canvas_size: tuple = (336, 336)  # (W, H) of each original image file
    display_max_pixels: int = 168 * 168  # max_pixels of originals: 336x336 shows at 168x168 = 36 visual tokens;
    #   canvas / display must be an even integer r (checked), marks vanish at the display
    grid: tuple = (2, 2)  # (columns, rows) of cells, 2 or 3 each; a card sits inside one cell, the gold bbox
    #   is that cell, and the think names it ("in the top left") before the bbox is written
    cell_margin: int = 8  # least space between a card and its cell's edge
    card_size: tuple = (80, 56)  # (w, h) of a card: 40x28 display px
    card_border: int = 12  # coloured frame around the card's flat grey label: 6 display px, so that a frozen
    #   random tower's features name the colour (3 px: caption at chance; README, "Learning to look")
    big_card_scale: float = 1.5  # linear size of an image's one large card relative to card_size
    big_card_share: float = 0.4  # share of images with a large card (always one for "largest color" questions)
    mark_kinds: tuple = ("dots",)  # mark kinds, drawn uniformly per sample: "dots" to count, "digit" to read
    dot_size: int = 12  # side of a square dot (6 display px at 1x, where its texture averages away; 12 crop px
    #   after one zoom); multiple of r. 8 px dots took a reading tower twice the steps (lab rows 17, 28)
    dot_gap: int = 4  # space between dot positions
    dot_grid: tuple = (3, 2)  # (columns, rows) of dot positions on a label
    dot_count: tuple = (1, 6)  # dots on a card, inclusive range
    digit_cell: int = 4  # px per cell of the 3x5 digit font (a 12x20 digit); multiple of r
    ink_levels: tuple = (40, 230)  # the two grey levels of the mark texture; the label is their mean
    solid_marks: bool = False  # marks in solid dark ink (ink_levels[0]) instead of the texture that vanishes at the
    #   display: they fade gradually as an image shrinks (the Figure 4 task, zoom_figure4.py)
    ramp: int = 40  # a colour ramp over every image, +-ramp grey levels: red grows left to right, blue top to
    #   bottom, so each patch's colour says where it is (a position cue: the lab's ground1, 51% -> 97.5%)
    question_first: bool = False  # the question before the images in the user turn, so that the image tokens
    #   can attend to it (the lab's ground: the colour look-up leaves chance only then)
    n_cards: tuple = (1, 1)  # cards per image, inclusive range; at most len(COLORS) and the cell count. One:
    #   finding a card among others by its colour is the wall a tiny LM escapes only after ~4,500 steps of 16
    #   (lab row 24), beyond the demo's budget; the question still names the card's colour
    n_clutter: tuple = (15, 30)  # background clutter shapes per image, inclusive range
    clutter_size: tuple = (6, 48)  # clutter shape size range
    multi_images: tuple = (2, 3)  # images in a multi-image sample, inclusive range
    share_text_only: float = 0.2  # samples answerable from the initial view: one answer step, no tool
    share_multi: float = 0.3  # of the tool-using samples: multi-image (one call names regions in every image)
    share_mc: float = 0.5  # of each category: multiple choice (options, letter answer); else numeric (MRA)
    share_crop_of_crop: float = 0.0  # of single-image tool-using samples: zoom on 2x2 cells, then on the card's
    #   (needs a 3x3 grid)
    share_direct: float = 0.1  # of the train split: "mode": "direct" records (no tools; a guess where the mark is
    #   needed), so the SFT model also knows the no-tool prompt of eval.py --mode direct: the demo's baseline
    max_tool_calls: int = 5  # the records' max_tool_calls
    seed: int = 0  # default seed of make_world


# The zoom world's prompts (every chat record's `system` and `prompt`, read alike by SFT, GRPO and
# eval). A deliberate difference from Figures 15/16 (~500 tokens around every question): with
# those, the tiny model never learned to copy the card's colour from the question (teacher-forced,
# 7/33 and 3/33 right, chance 1/7, after 384 steps of 8 and 600 of 2). Then ~45 tokens (a
# one-sentence system prompt, Figure 16's index and size lines, a one-line instruction, the
# question) still kept a random tiny model from learning to read: the same reading records, 500
# steps of 16, gave 25% held-out with that prompt and 90% with a one-word system prompt and the
# images followed by the question (README, "Learning to look", runs R1-R4): at first the answer
# attends evenly over everything before it, so every prompt token dilutes what the image tokens
# teach. So it asks with the images and the question alone; the tool-call format is learned from
# the gold turns; observations stay SPEC 4's.
SYSTEM = "Look."


def user_turn(n_images, question, question_first=False):
    """The zoom world's user turn ('<image>' placeholders, the record's "prompt"): the images in
    index order, then the question (or the question first: ZoomWorldConfig.question_first)."""
    if question_first:
        return question + "\n" + "<image>" * n_images
    return "<image>" * n_images + question


PLACES = ("in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
             "in the bottom left", "at the bottom", "in the bottom right")
TEXT = {  # every sentence of the zoom world; {mark}: "dots are" / "digit is", {marks}: "dots" / "digits"
    "q_dots": "How many dots are on the {color} card?",
    "q_digit": "What digit is on the {color} card?",
    "q_which_dots": "Which image has the {color} card with {value} dots?",
    "q_which_digit": "Which image has the {color} card with the digit {value}?",
    "q_total_dots": "How many dots are there in total on the {color} cards of these images?",
    "q_total_digit": "What is the sum of the digits on the {color} cards of these images?",
    "q_largest": "What color is the largest card in the image?",
    "q_cards": "How many cards are there in the image?",
    "query_dots": "count the dots on the {color} card",
    "query_digit": "read the digit on the {color} card",
    "query_multi_dots": "count the dots on the {color} card in each image",
    "query_multi_digit": "read the digit on the {color} card in each image",
    "query_find": "find the {color} card",
    "t_zoom": "The question is about the {color} card, which is {place} of image {index}. Its {mark} too small "
              "to {verb} at this resolution, so I will zoom in on it.",
    "t_find": "The {color} card is {place} of image {index}, but it is small. I will first zoom in on that area.",
    "t_refine": "Zoom-in image {k} shows the {color} card, but its {mark} still small. I will zoom in on the card "
                "itself.",
    "t_multi": "I need the {color} card in each of the {n} images: it is {places}. Their {marks} are too small "
               "to {verb} here, so I will zoom in on all of them at once.",
    "t_place": "{place} of image {index}",
    "t_read_dots": "In zoom-in image {k}, the {color} card has {value} dots.",
    "t_read_digit": "In zoom-in image {k}, the {color} card shows the digit {value}.",
    "t_list_dots": "image {index}: {value} dots",
    "t_list_digit": "image {index}: digit {value}",
    "t_multi_read": "The zoom-in images show the {color} cards: {listing}.",
    "t_which": "So the {color} card with {target} is in image {index}.",
    "t_total": "In total that is {expr} = {value}.",
    "q_where": "Where is the {color} card?",
    "q_where_multi": "Where is the {color} card in each image?",
    # the first sentence of t_zoom and of t_multi, so that grounding learnt on the perception records
    # carries over word for word to a trajectory's first think
    "t_where": "The question is about the {color} card, which is {places}.",
    "t_where_multi": "I need the {color} card in each of the {n} images: it is {places}.",
    "t_read_image": "In image {index}, the {color} card has {value} dots.",
    "t_largest": "The largest card is {place} of the image, and it is {color}. That is clear without zooming in.",
    "t_cards": "All cards are clearly visible without zooming in: there are {value} of them.",
    "t_option": " That is option {letter}.",
    "t_guess": "The question is about the {color} card, which is {place} of image {index}. Its {mark} too small to "
               "{verb} at this resolution, and no zoom-in tool is available, so I can only guess.",
    "t_guess_multi": "I need the {color} card in each of the {n} images: it is {places}. Their {marks} are too small "
                     "to {verb} here, and no zoom-in tool is available, so I can only guess.",
}
_KIND = {"dots": dict(mark="dots are", marks="dots", verb="count"),
            "digit": dict(mark="digit is", marks="digits", verb="read")}


def world_texts():
    """The zoom world's sentences filled with every colour, place and small number (the tokenizer corpus)."""
    out = []
    for c, color in enumerate(COLORS):
        for kind, words in _KIND.items():
            for key, t in TEXT.items():
                v = (c % 6) + 1
                out.append(t.format(color=color, place=PLACES[(c + len(key)) % 9], index=c % 3, k=c % 3 + 1,
                                    n=c % 3 + 2, value=v, target=f"{v} dots", listing=f"{v} dots", expr=f"{v} + 2",
                                    places=f"{PLACES[c]} of image 0, {PLACES[8 - c]} of image 1",
                                    letter="ABCD"[c % 4], **words))
    out += [f"{chr(65 + i)}. {v}" for i in range(4) for v in ["Image 0", *COLORS, *range(10)]]
    return out


def _place(cfg, box):
    """The place phrase of the grid cell holding a card box."""
    return _cell_place(cfg, *zs.cell(cfg, box))


def _cell_place(cfg, c, r):
    """The place phrase of grid cell (column c, row r): a 3x3 grid has all nine phrases, a 2x2
    grid the four corners."""
    cols, rows = cfg.grid
    return PLACES[r * 2 // (rows - 1) * 3 + c * 2 // (cols - 1)]


def _options(rng, answer, pool):
    """Four options (the answer and three others of pool), sorted; returns (options, letter)."""
    others = [p for p in pool if p != answer]
    chosen = sorted([answer] + [others[i] for i in rng.permutation(len(others))[:3]])
    return [f"{chr(65 + i)}. {v}" for i, v in enumerate(chosen)], chr(65 + chosen.index(answer))


def _sample(rng, cfg, geom, budget, spec, name):
    """One record and its images (name_j.png) from a spec (category, multiple choice?, crop of
    crop?, direct?), as _specs makes them."""
    Wd, Hd, r = geom
    OW, OH = cfg.canvas_size
    category, mc, zoom2, direct = spec
    zoom2 = zoom2 and not direct
    kind = str(cfg.mark_kinds[int(rng.integers(len(cfg.mark_kinds)))])
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    words = dict(_KIND[kind], color=color)
    pool = mark_values(cfg, kind)
    steps, options = [], None
    if category == "multi":
        n_img = int(rng.integers(cfg.multi_images[0], cfg.multi_images[1] + 1))
        values = [pool[i] for i in rng.permutation(len(pool))[:n_img]]  # distinct: "which image" is unique
        scenes = [zs.scene(rng, cfg, r, kind, [color], {color: v}) for v in values]
    elif category == "single":
        value = pool[int(rng.integers(len(pool)))]
        scenes = [zs.scene(rng, cfg, r, kind, [color], {color: value})]
    else:
        task = "largest" if mc else "cards"
        big = color if task == "largest" else None
        scenes = [zs.scene(rng, cfg, r, kind, [color], {}, big=big)]
    images = [zs.render(rng, cfg, r, cards) for cards in scenes]
    targets = [next(c for c in cards if c["color"] == color) for cards in scenes]
    target_boxes = [zs.normalised(cfg, t["box"]) for t in targets]

    if category == "text-only":
        cards = scenes[0]
        if mc:
            present = [c["color"] for c in cards if c["color"] != color]  # distractors: other cards' colours first
            rest = [c for c in COLORS if c != color and c not in present]
            cand = [present[i] for i in rng.permutation(len(present))] + [rest[i] for i in rng.permutation(len(rest))]
            picks = [color] + cand[:3]
            picks = [picks[i] for i in rng.permutation(4)]
            options = [f"{chr(65 + i)}. {c}" for i, c in enumerate(picks)]
            answer, question = chr(65 + picks.index(color)), TEXT["q_largest"]
            think = TEXT["t_largest"].format(place=_place(cfg, targets[0]["box"]), color=color)
            think += TEXT["t_option"].format(letter=answer)
            task = "largest-color"
        else:
            answer, question, task = str(len(cards)), TEXT["q_cards"], "count-cards"
            think, target_boxes = TEXT["t_cards"].format(value=len(cards)), [None]
        steps.append({"think": think, "answer": answer})
    elif category == "single":
        t = targets[0]
        cell = zs.cell(cfg, t["box"])
        if zoom2:  # a block of 2x2 cells holding the card's cell first, then that cell inside the crop
            c1 = tuple(min(max(0, c - int(rng.integers(2))), n - 2) for c, n in zip(cell, cfg.grid))
            b1 = zs.cells_bbox(cfg, geom, c1, (c1[0] + 1, c1[1] + 1))
            region1, display1 = zs.crop_display((OW, OH), (0, 0, 1, 1), (Wd, Hd), b1, budget)
            cell_box = zs.cells_bbox(cfg, geom, cell)
            b2 = [round(v) for v in zs.in_display([cell_box[0] / Wd, cell_box[1] / Hd, cell_box[2] / Wd, cell_box[3] / Hd],
                                           region1, display1)]
            steps.append({"think": TEXT["t_find"].format(place=_place(cfg, t["box"]), index=0, **words),
                          "tool": {"region": [{"index": 0, "bbox_2d": b1}],
                                   "query": TEXT["query_find"].format(**words)}})
            steps.append({"think": TEXT["t_refine"].format(k=1, **words),
                          "tool": {"region": [{"index": 1, "bbox_2d": b2}],
                                   "query": TEXT[f"query_{kind}"].format(**words)}})
        else:
            b = zs.cells_bbox(cfg, geom, cell)
            steps.append({"think": TEXT["t_zoom"].format(place=_place(cfg, t["box"]), index=0, **words),
                          "tool": {"region": [{"index": 0, "bbox_2d": b}],
                                   "query": TEXT[f"query_{kind}"].format(**words)}})
        k = len(steps)  # the last crop's index
        question = TEXT[f"q_{kind}"].format(**words)
        think = TEXT[f"t_read_{kind}"].format(k=k, value=t["value"], **words)
        answer = str(t["value"])
        if mc:
            options, answer = _options(rng, t["value"], pool)
            think += TEXT["t_option"].format(letter=answer)
        steps.append({"think": think, "answer": answer})
        task = ("count-dots" if kind == "dots" else "read-digit") + ("-zoom2" if zoom2 else "")
    else:
        n_img = len(scenes)
        regions = [{"index": i, "bbox_2d": zs.cells_bbox(cfg, geom, zs.cell(cfg, t["box"]))}
                   for i, t in enumerate(targets)]
        places = ", ".join(TEXT["t_place"].format(place=_place(cfg, t["box"]), index=i)
                           for i, t in enumerate(targets))
        steps.append({"think": TEXT["t_multi"].format(n=n_img, places=places, **words),
                      "tool": {"region": regions, "query": TEXT[f"query_multi_{kind}"].format(**words)}})
        listing = ", ".join(TEXT[f"t_list_{kind}"].format(index=i, value=t["value"]) for i, t in enumerate(targets))
        think = TEXT["t_multi_read"].format(listing=listing, **words)
        if mc:
            j = int(rng.integers(n_img))
            v = targets[j]["value"]
            question = TEXT[f"q_which_{kind}"].format(value=v, **words)
            options = [f"{chr(65 + i)}. Image {i}" for i in range(n_img)]
            answer = chr(65 + j)
            think += " " + TEXT["t_which"].format(target=f"{v} dots" if kind == "dots" else f"the digit {v}",
                                                     index=j, **words)
            think += TEXT["t_option"].format(letter=answer)
            task = "which-image"
        else:
            total = sum(t["value"] for t in targets)
            question = TEXT[f"q_total_{kind}"].format(**words)
            answer = str(total)
            think += " " + TEXT["t_total"].format(expr=" + ".join(str(t["value"]) for t in targets), value=total)
            task = "total"
        steps.append({"think": think, "answer": answer})
    if direct and category != "text-only":  # no tool: the same question, answered with a guess
        if category == "single":
            think = TEXT["t_guess"].format(place=_place(cfg, targets[0]["box"]), index=0, **words)
        else:
            think = TEXT["t_guess_multi"].format(n=len(scenes), places=places, **words)
        steps = [{"think": think + (TEXT["t_option"].format(letter=answer) if mc else ""), "answer": answer}]

    paths = [f"images/{name}_{j}.png" for j in range(len(images))]
    rec = {"id": name, "images": paths, "question": question, "options": options,
           "problem_type": "multiple choice" if options else "numerical", "answer": answer,
           "max_pixels": cfg.display_max_pixels, "max_tool_calls": cfg.max_tool_calls,
           "category": category, "task": task, "mark": kind, "target_boxes": target_boxes, "steps": steps,
           "scene": [[{"color": c["color"], "box": zs.normalised(cfg, c["box"]), "value": c["value"]} for c in cards]
                     for cards in scenes]}  # the mined knowledge: every card of every image
    if direct:
        rec.update(mode="direct", max_tool_calls=0)
    else:
        rec.update(system=SYSTEM, prompt=user_turn(len(images), format_question(question, options), cfg.question_first))
    return rec, images


def _specs(rng, cfg, n, share_direct=0.0):
    """(category, multiple choice?, crop of crop?, direct?) for n samples, the shares met as
    closely as n allows, in random order."""
    n_text = round(cfg.share_text_only * n)
    n_multi = round(cfg.share_multi * (n - n_text))
    n_single = n - n_text - n_multi
    n_zoom2 = round(cfg.share_crop_of_crop * n_single)
    specs = []
    for cat, m in (("text-only", n_text), ("multi", n_multi), ("single", n_single)):
        n_mc = round(cfg.share_mc * m)
        mcs = [k < n_mc for k in range(m)]
        mcs = [mcs[i] for i in rng.permutation(m)]  # independent of the crop-of-crop flag
        specs += [(cat, bool(mcs[k]), cat == "single" and k < n_zoom2) for k in range(m)]
    direct = rng.permutation(n) < round(share_direct * n)  # any category
    return [specs[i] + (bool(d),) for i, d in zip(rng.permutation(n), direct)]


def display_budget(cfg=ZoomWorldConfig()):
    """The Budget the zoom world's images are made for: the scripts' defaults (8,192 visual
    tokens) with every image at most the display size, which each record also carries as its own
    max_pixels: sft.py, grpo.py and eval.py cap its originals and crops with it (data.Context.of)."""
    return Budget(max_pixels=cfg.display_max_pixels, crop_max_pixels=cfg.display_max_pixels)


def make_world(out_dir, n_train=512, n_eval=128, cfg=ZoomWorldConfig(), seed=None):
    """Write the zoom world: out_dir/images/*.png, train.jsonl (gold trajectories), eval.jsonl
    (the same schema, gold steps included for inspection). Every record also has `category`
    ("single", "multi", "text-only"), `task`, `mark` ("dots"/"digit"), `target_boxes` (per
    original image the target card's box normalised to the original, null where there is
    none), `scene` (every card: colour, normalised box, mark value) and `max_pixels` (the
    display budget of its originals); chat records carry their `system` prompt and user turn
    (`prompt`), and a share_direct of the train split is `"mode": "direct"`. meta.json holds
    the Budget, the config and the counts per task. Image paths in the records are relative to out_dir (the image root).
    Deterministic for a seed (None: cfg.seed); sample i of a split does not depend on how many
    samples are made. Returns {"train", "eval", "meta", "image_root", "budget"}."""
    seed = cfg.seed if seed is None else seed
    geom = zs.geometry(cfg)
    budget = display_budget(cfg)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths, counts = {}, {}
    for split_id, (split, n) in enumerate((("train", n_train), ("eval", n_eval))):
        specs = _specs(np.random.default_rng([seed, split_id]), cfg, n, cfg.share_direct if split == "train" else 0)
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        counts[split] = {}
        with open(paths[split], "w") as f:
            for i, spec in enumerate(specs):
                rec, images = _sample(np.random.default_rng([seed, split_id, i]), cfg, geom, budget, spec,
                                         f"{split}_{i:05d}")
                for p, img in zip(rec["images"], images):
                    img.save(os.path.join(out_dir, p), compress_level=1)
                f.write(json.dumps(rec) + "\n")
                counts[split][rec["task"]] = counts[split].get(rec["task"], 0) + 1
    meta = {"task": "zoom world", "budget": asdict(budget), "display_size": list(geom[:2]), "seed": seed,
            "n_train": n_train, "n_eval": n_eval, "counts": counts, "config": asdict(cfg)}
    paths["meta"] = os.path.join(out_dir, "meta.json")
    with open(paths["meta"], "w") as f:
        json.dump(meta, f, indent=1)
    return dict(paths, image_root=out_dir, budget=budget)


# -----------------------------------------------------------------------------
# the perception stage: a base that can see (issue 12; the paper starts from a pretrained VLM)


def _perception_sample(rng, cfg, geom, name, read, share_multi=0.5, share_mc=0.0, share_zoom=0.0, share_zoom_multi=0.0,
                       share_colour=0.0, share_mc_multi=0.0):
    """One record and its images: where the asked card is in one scene, or with probability
    share_multi in each of 2-3 (the think names the places as a trajectory's first think does; the
    answer is the cells' bboxes, as its tool call writes them), or read=True: the dots on the card
    of one gold zoom (the cell cut from the original at twice the display scale, shown as an image
    of its own), with probability share_mc as a multiple-choice question whose think ends as a
    trajectory's does ("... has 4 dots. That is option C."). These are one step each. With
    probability share_zoom a reading record is instead a whole single-image chat (_sample: the
    original, the gold tool call, its crop as the tool's answer, the dots read there): a count
    learnt on a crop alone is not found again beside the original (README, "Learning to look", M1).
    With probability share_zoom_multi such a chat is over 2-3 originals instead (one call, a region
    in each, the crops encoded as one group): the counts read in a joint group, multiple choice with
    probability share_mc_multi (default 0: the total of the dots, asked numerically; with options as
    often as the single-image ones, the single-image trajectories' option look-up fell: V2 and V2b in
    the README's seventh round). With probability share_colour a grounding record is instead the
    trajectories' colour question ("What colour is the largest card?", one step, _sample's): the
    only record that names a colour it sees."""
    spec = None  # a trajectory record instead (_sample's spec)
    if not read and share_colour > 0 and rng.random() < share_colour:
        spec = ("text-only", True, False, False)
    elif read and share_zoom > 0 and rng.random() < share_zoom:
        category = "multi" if share_zoom_multi > 0 and rng.random() < share_zoom_multi else "single"
        spec = (category, bool(rng.random() < (share_mc if category == "single" else share_mc_multi)), False, False)
    if spec is not None:
        rec, images = _sample(rng, cfg, geom, display_budget(cfg), spec, name)
        return dict(rec, images=[f"perception/{name}_{j}.png" for j in range(len(images))]), images
    Wd, Hd, r = geom
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    options = None
    if read:
        value = int(rng.integers(cfg.dot_count[0], cfg.dot_count[1] + 1))
        cards = zs.scene(rng, cfg, r, "dots", [color], {color: value})
        t = next(c for c in cards if c["color"] == color)
        images = [zs.cell_crop(cfg, zs.render(rng, cfg, r, cards), t["box"])]
        question = TEXT["q_dots"].format(color=color)
        think, answer = TEXT["t_read_image"].format(index=0, color=color, value=value), str(value)
        if rng.random() < share_mc:
            options, answer = _options(rng, value, mark_values(cfg, "dots"))
            think += TEXT["t_option"].format(letter=answer)
    else:
        n = 1 if rng.random() < 1 - share_multi else int(rng.integers(cfg.multi_images[0], cfg.multi_images[1] + 1))
        scenes = [zs.scene(rng, cfg, r, "dots", [color], {}) for _ in range(n)]
        images = [zs.render(rng, cfg, r, cards) for cards in scenes]
        targets = [next(c for c in cards if c["color"] == color) for cards in scenes]
        question = TEXT["q_where_multi" if n > 1 else "q_where"].format(color=color)
        places = ", ".join(TEXT["t_place"].format(place=_place(cfg, t["box"]), index=i) for i, t in enumerate(targets))
        boxes = [{"index": i, "bbox_2d": zs.cells_bbox(cfg, geom, zs.cell(cfg, t["box"]))} for i, t in enumerate(targets)]
        think = TEXT["t_where_multi" if n > 1 else "t_where"].format(color=color, n=n, places=places)
        answer = json.dumps(boxes)
        target_boxes = [zs.normalised(cfg, t["box"]) for t in targets]
    paths = [f"perception/{name}_{j}.png" for j in range(len(images))]
    rec = {"id": name, "images": paths, "question": question, "options": options, "task": "read" if read else "ground",
           "max_pixels": cfg.display_max_pixels, "system": SYSTEM, "steps": [{"think": think, "answer": answer}],
           "prompt": user_turn(len(images), format_question(question, options), cfg.question_first)}
    if not read:
        rec["target_boxes"] = target_boxes  # as make_world's: the asked card's box, normalised to each original
    return rec, images


def make_perception(out_dir, n, cfg=ZoomWorldConfig(), seed=None, share_read=0.5, share_multi=0.5, share_mc=0.0,
                    share_zoom=0.0, share_zoom_multi=0.0, share_colour=0.0, share_mc_multi=0.0, name="perception"):
    """Write out_dir/{name}.jsonl (n records, sft.py's schema: share_read of them reading,
    share_mc of those multiple choice and share_zoom of them whole chats, share_zoom_multi of
    those over 2-3 images and share_mc_multi of these multiple choice; the rest grounding,
    share_multi of those in 2-3 images and share_colour of them the colour question instead;
    _perception_sample) and their images under out_dir/perception/.
    Deterministic for a seed (None: cfg.seed) and name; its own random streams, apart from make_world's."""
    seed = cfg.seed if seed is None else seed
    geom = zs.geometry(cfg)
    os.makedirs(os.path.join(out_dir, "perception"), exist_ok=True)
    stream = [seed, 7, zlib.crc32(name.encode())]
    read = np.random.default_rng(stream).permutation(n) < round(share_read * n)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            rec, images = _perception_sample(np.random.default_rng(stream + [i]), cfg, geom, f"{name}_{i:05d}", read[i],
                                              share_multi, share_mc, share_zoom, share_zoom_multi, share_colour,
                                              share_mc_multi)
            for p, img in zip(rec["images"], images):
                img.save(os.path.join(out_dir, p), compress_level=1)
            f.write(json.dumps(rec) + "\n")
    return path


# -----------------------------------------------------------------------------
# presets: the demo's sizes, one entry per preset (gpt-fast's transformer_configs). Each stage's
# flags are written as a user types them; everything else is the scripts' own default, i.e. the
# paper's 7B setting. The model is model.tiny_config in both presets.

PRESETS = {
    "tiny": dict(  # the README's demo: `python zoom_world.py`
        world=dict(n_train=2048, n_eval=256, seed=0),
        # the perception stages (issue 12: a base that can see, before any trajectory), each its
        # records (make_perception's arguments) and sft.py's flags. "look": where the asked card is,
        # in one image, the tower frozen (it trains its LM read-out fastest; README, "Learning to
        # look"); "read": the dots on a gold zoom (55%), half of them as multiple choice, and
        # grounding (45%), three quarters of it over 2-3 images, the tower at a tenth of the LM's lr
        # (at the same lr its features collapse into one shared mean). Single images first: with
        # half the grounding records over 2-3 images, `look` left single-image grounding at 40%
        # after 1,000 steps of 16; on single images alone, 94%. Then many images: without them the
        # trajectories' boxes in a question's second and third image hit their card in 41-62% of
        # the calls (a blind guess: 25%), with them 43-100% (H0-H2). Multiple choice: without it the trajectories never
        # learnt to find their count among the options (the option probe at chance, 25%); with it,
        # 71-72% (README, "Learning to look", D1-D7). A third of the reading records (share_zoom)
        # as whole single-image chats: a count learnt on crops alone was not found again in a chat,
        # beside the original (the reading probe 13% after `read`, 48% after SFT); with them, 69% and
        # the validation score 55.0 -> 62.7 (M1).
        # rehearse: the first 1,024 `read` records shuffled into the trajectory SFT's data (without
        # them it forgot the reading: 38% on the records themselves after `read`, 20% after SFT).
        # `read` runs 4 epochs: at 2 it read 77-81% of the held-out crops, at 4 (one schedule) 95%
        # with the grounding kept at 100%, and its SFT model scored +7.7 +- 3.2 on validation
        # (README, eighth round, E4); at 3, 90% and -8.2 +- 2.5 against 4 (ninth round, E3). It is
        # half the demo's time (24.8 of 48.0 minutes with 2 threads on the README's machine)
        perception=dict(look=dict(n=8000, share_read=0.0, share_multi=0.0),
                        read=dict(n=9000, share_read=0.55, share_multi=0.75, share_mc=0.5, share_zoom=0.333),
                        heldout=200, rehearse=1024),
        look="--lr 1e-3 --freeze-vision --global-batch 16 --epochs 2 --no-activation-checkpointing",
        read="--lr 1e-3 --vision-lr 1e-4 --global-batch 16 --epochs 4 --no-activation-checkpointing",
        # batch 2 on purpose: a sample costs about the same at batch 2 as at batch 8 (sft.py's
        # micro-batching gains ~1.1-1.2x on this CPU: the work is compute, not per-call overhead),
        # but batch 2 gives 4x the optimizer steps, and the tiny model's copying skills only formed
        # with more steps (measured: 384 steps of 8 left the card's colour at chance, 7/33). lr 3e-4,
        # not the perception stages' 1e-3: at 1e-3 and batch 2 the first 100 steps undid what
        # perception had taught (reading 93% -> 44%, grounding 55% -> 43% on the perception records;
        # the features' shared mean grew 0.058 -> 0.1); at 3e-4 SFT kept and extended both (D3-D4).
        # The paper's 1e-5 moves a tiny model far too slowly.
        sft="--lr 3e-4 --vision-lr 3e-5 --global-batch 2 --epochs 1 --no-activation-checkpointing",
        # 16 prompts a step at the paper's temperature 0.75 and lr 1e-5: at 8 prompts, T 1.0 and lr
        # 5e-5 the reward fell (0.95 -> 0.69) and a third of the tool calls broke; at 3e-5, or with
        # the tower unfrozen, the validation score fell 2-2.5 points; at 1e-5 it held (G0-G7)
        grpo="--steps 40 --prompts-per-step 16 --group-size 4 --temperature 0.75 --max-turn-tokens 256 "
             "--max-new-tokens 512 --max-context 4096 --lr 1e-5 --no-activation-checkpointing",
        # greedy, unlike the paper's benchmark runs (T 0.75, top-p 0.9): a model of a few million
        # parameters trained for minutes is brittle under sampling (a stray digit breaks a box),
        # and greedy makes the table reproducible to the digit
        eval="--greedy --batch-size 16 --max-turn-tokens 256 --max-new-tokens 768 --max-context 4096",
    ),
    "smoke": dict(  # `--smoke`: the same sequence in miniature (CI): every stage runs and hands on its checkpoint
        world=dict(n_train=16, n_eval=8, seed=0),
        perception=dict(look=dict(n=8, share_read=0.0, share_multi=0.0),
                        read=dict(n=8, share_read=0.5, share_multi=0.75, share_mc=0.5, share_zoom=0.5),
                        heldout=4, rehearse=4),
        look="--lr 1e-3 --freeze-vision --global-batch 4 --epochs 1 --no-activation-checkpointing",
        read="--lr 1e-3 --vision-lr 1e-4 --global-batch 4 --epochs 1 --no-activation-checkpointing",
        sft="--lr 3e-4 --vision-lr 3e-5 --global-batch 2 --epochs 1 --no-activation-checkpointing",
        grpo="--steps 2 --prompts-per-step 2 --group-size 2 --temperature 0.75 --max-turn-tokens 32 "
             "--max-new-tokens 64 --max-context 4096 --lr 1e-5 --no-activation-checkpointing",
        eval="--greedy --batch-size 8 --max-turn-tokens 32 --max-new-tokens 64 --max-context 4096",
    ),
}

# the results table: row name, the stage whose checkpoint it evaluates, eval.py flags
ROWS = (("direct", "sft", "--mode direct"),  # the SFT model answering directly (no tools)
        ("chat", "sft", "--mode chat"),  # the SFT model chatting with images
        ("grpo", "grpo", "--mode chat"),  # after GRPO
        ("vanilla", "grpo-vanilla", "--mode chat"),  # the same SFT + GRPO with the vanilla encoder
        ("no_inquiry", "grpo", "--mode chat --no-inquiry"),  # after GRPO, the query blanked at re-encoding
        ("blank_crops", "sft", "--mode chat --blank-crops"))  # the chat row with every crop flat grey: what looking buys

# -----------------------------------------------------------------------------
# the driver


@dataclass
class Lane:
    """Where the driver runs a script: with `threads` (OMP_NUM_THREADS, written into the printed
    command as a user would type it; None: inherited) and its output to `log` (None: the terminal).
    Two lanes run two pipelines side by side (side_by_side); `proc` is the script running now,
    `stopped` is set when another lane failed."""
    threads: int | None = None
    log: str | None = None
    proc: subprocess.Popen | None = None
    stopped: bool = False

    def run(self, script, *flags):
        """`python script flags...` from this folder, printed first as a user would type it."""
        script = os.path.join(HERE, script)
        cmd = [script if os.path.relpath(script).startswith("..") else os.path.relpath(script)] + [str(f) for f in flags]
        env = "" if self.threads is None else f"OMP_NUM_THREADS={self.threads} "
        print(f"\n$ {env}python {shlex.join(cmd)}" + (f" >> {self.log} 2>&1" if self.log else ""), flush=True)
        self.call([sys.executable] + cmd)

    def call(self, argv):
        env = dict(os.environ, **({} if self.threads is None else dict(OMP_NUM_THREADS=str(self.threads))))
        if self.log:
            os.makedirs(os.path.dirname(self.log) or ".", exist_ok=True)
        if self.stopped:
            raise RuntimeError(f"not started, another lane failed: {shlex.join(argv)}")
        out = open(self.log, "a") if self.log else None  # None: the terminal's
        try:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out and subprocess.STDOUT)
            rc = self.proc.wait()
        finally:
            if out is not None:
                out.close()
        if rc != 0:
            raise subprocess.CalledProcessError(rc, argv)


def side_by_side(lanes, jobs):
    """Run jobs[i](lanes[i]) at once, one thread each; the first to fail stops the others' scripts
    and its error is raised here, so a failed stage ends the demo as it does run alone. The lanes
    start unstopped, so lanes that an earlier failure stopped can run again."""
    errors = []
    for lane in lanes:
        lane.stopped = False

    def work(lane, job):
        try:
            job(lane)
        except BaseException as e:  # noqa: B036 (re-raised in the caller's thread)
            errors.append(e)
            for other in lanes:
                other.stopped = True
                if other.proc is not None and other.proc.poll() is None:
                    other.proc.terminate()

    threads = [threading.Thread(target=work, args=(lane, job)) for lane, job in zip(lanes, jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def build_once(folder, want, build, what):
    """build(tmp) writes a data folder whose meta.json holds `want` (as JSON reads it back), unless
    `folder` already does; the temp folder replaces `folder` whole, so a kill leaves the old one."""
    want = json.loads(json.dumps(want))
    meta = os.path.join(folder, "meta.json")
    if os.path.exists(meta) and want == {k: v for k, v in read_json(meta).items() if k in want}:
        return print(f"{folder}: up to date, skipped")
    print(f"writing {what} to {folder}", flush=True)
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    build(folder + ".tmp")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(folder + ".tmp", folder)


def make_data(zoom, world, perception):
    """The task's data (make_world; make_perception's records of each perception stage, and
    `heldout` more, all reading and grounding alike, to probe them; train_rehearse.jsonl: the
    trajectories with the first `rehearse` reading-stage records shuffled in), unless zoom/
    already holds it for these sizes and this config."""
    def build(tmp):
        make_world(tmp, **world)
        for name, kw in dict(look=perception["look"], read=perception["read"],
                             heldout=dict(n=perception["heldout"], share_read=0.5, share_multi=0.5)).items():
            make_perception(tmp, **kw, seed=world["seed"], name=f"perception_{name}")
        with open(os.path.join(tmp, "train.jsonl")) as f, open(os.path.join(tmp, "perception_read.jsonl")) as g:
            mix = f.readlines() + g.readlines()[:perception["rehearse"]]
        random.Random(world["seed"]).shuffle(mix)
        with open(os.path.join(tmp, "train_rehearse.jsonl"), "w") as f:
            f.writelines(mix)
        m = read_json(os.path.join(tmp, "meta.json"))
        atomic_write(os.path.join(tmp, "meta.json"), json.dumps(dict(m, perception=perception), indent=1))
    build_once(zoom, dict(world, perception=perception, config=asdict(ZoomWorldConfig())), build,
               f"the zoom world ({world['n_train']} train, {world['n_eval']} eval; perception {perception})")


def train(script, model, data, out_dir, flags, lane=None):
    """One training stage: skipped when out_dir's checkpoint is final and newer than the model and
    the data it started from; continued with --resume when cut short; redone when stale."""
    ckpt, t = latest_checkpoint(out_dir), os.path.getmtime
    if ckpt is not None and t(os.path.join(ckpt, "meta.json")) < max(t(os.path.join(model, "config.json")), t(data)):
        print(f"{out_dir}: older than its input, redone")
        shutil.rmtree(out_dir)
        ckpt = None
    meta = read_json(os.path.join(ckpt, "meta.json")) if ckpt is not None else None
    if meta is not None and meta["step"] >= meta["num_steps"]:
        return print(f"{out_dir}: done (step {meta['step']}), skipped")
    (lane or Lane()).run(script, "--model", model, "--data", data, "--image-root", os.path.dirname(data),
                         "--out-dir", out_dir, *flags.split(), *(["--resume"] if os.path.exists(out_dir) else []))


def evaluate(ckpt, bench, out, flags, n, written=None, lane=None):
    """eval.py on the held-out split, unless every file it writes (`written`, default [out]; a
    --sweep writes one per budget) holds all n answers, newer than ckpt."""
    written, done = written or [out], 0
    for f in written:
        if os.path.exists(f) and os.path.getmtime(f) < os.path.getmtime(os.path.join(ckpt, "meta.json")):
            os.remove(f)  # a re-trained stage: its old answers are stale
        done += os.path.exists(f) and sum(ln.get("error") is None for ln in read_results(results_files(f))[0].values()) == n
    if done == len(written):
        return print(f"{out}: done, skipped")
    (lane or Lane()).run("eval.py", "--model", ckpt, "--bench", bench, "--image-root", os.path.dirname(bench),
                         "--out", out, *flags.split())


def parse_args(argv, description, presets, folder):
    """The drivers' flags (--smoke, --out, --seed): returns the preset to run (its world's seed
    overridden by --seed) and its folder (--out, else out/[smoke/]folder)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true",
                    help=f"the smoke preset, under {os.path.join('out/smoke', folder)} (CI)")
    ap.add_argument("--out", help=f"the run's folder (default: {os.path.join('out', folder)}, or "
                                  f"{os.path.join('out/smoke', folder)} with --smoke)")
    ap.add_argument("--seed", type=int, help="the task data's seed (default: the preset's)")
    args = ap.parse_args(argv)
    preset = presets["smoke" if args.smoke else "tiny"]
    if args.seed is not None:
        preset = dict(preset, world=dict(preset["world"], seed=args.seed))
    root = args.out or os.path.join("out", "smoke" if args.smoke else "", folder)
    return preset, root.rstrip("/") or "."


def main(argv=None):
    import zoom_metrics as zm  # the demo's instruments (their own file, which imports this one)
    preset, root = parse_args(argv, "The zoom-world demo: data, tiny models, SFT, GRPO, eval (README)", PRESETS, "")
    t0, times = time.time(), {}
    zoom = os.path.join(root, "zoom")
    make_data(zoom, preset["world"], preset["perception"])
    base, embedder = os.path.join(root, "tiny-base"), os.path.join(root, "tiny-embedder")
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"building the random tiny stock base model {base}", flush=True)
        build_tiny_base(base, vanilla=True)
    if not os.path.exists(os.path.join(embedder, "config.json")):
        print(f"building the random tiny inquiry encoder {embedder}", flush=True)
        build_tiny_embedder(embedder)
    times["data and bases"] = time.time() - t0
    # The paper's order in miniature: the perception stages make a stock model that can see (the
    # miniature Qwen2.5-VL-7B), once, with every core; then ViLaVT is built from it and the tiny
    # inquiry encoder (`sft.py --embedder`, as at 7B: the new layers initialised, the query-aware
    # layers 4-7 switched from window to full attention, 1% of the features' norm on the first
    # `look` model) and its vanilla twin keeps it as it is. The two pipelines then share nothing
    # until eval, so they run side by side, each with half the cores and its output in out/logs/:
    # a model this small gains only 1.4x from a second thread (a `read` step: 1.06 s on one, 0.74 s
    # on two), while two one-thread scripts at once keep their speed (0.98-1.01 s).
    # torchrun --nproc_per_node 2 on the CPU gained only 1.13x (0.92 s; FSDP's collectives per block).
    for stage, model, data in (("look", "tiny-base", "perception_look.jsonl"), ("read", "look/latest", "perception_read.jsonl")):
        ts = time.time()
        train("sft.py", os.path.join(root, model), os.path.join(zoom, data), os.path.join(root, stage), preset[stage],
              Lane(torch.get_num_threads(), os.path.join(root, "logs", "perception.log")))
        times[stage] = time.time() - ts
    t = time.time()
    lanes = [Lane(max(1, torch.get_num_threads() // 2), os.path.join(root, "logs", name + ".log"))
             for name in ("vilavt", "vanilla")]

    def pipeline(v):
        def job(lane):  # (stage, its script, the model it starts from, its data, extra flags)
            for stage, script, model, data, extra in (
                    ("sft", "sft", "read/latest", "train_rehearse.jsonl", "" if v else f" --embedder {embedder}"),
                    ("grpo", "grpo", f"sft{v}/latest", "train.jsonl", "")):
                ts = time.time()
                train(script + ".py", os.path.join(root, model), os.path.join(zoom, data),
                      os.path.join(root, stage + v), preset[stage] + extra, lane)
                times[stage + v] = time.time() - ts
        return job
    side_by_side(lanes, [pipeline(""), pipeline("-vanilla")])
    times["both pipelines"] = time.time() - t
    t = time.time()
    bench, demo = os.path.join(zoom, "eval.jsonl"), os.path.join(root, "demo")
    questions, rows = load_bench(bench), []
    ckpts = {row: latest_checkpoint(os.path.join(root, stage)) for row, stage, _ in ROWS}
    outs = {row: os.path.join(demo, row + ".jsonl") for row, _, _ in ROWS}

    def rows_job(i):  # the rows, alternately to each lane
        return lambda lane: [evaluate(ckpts[row], bench, outs[row], flags + " " + preset["eval"], len(questions),
                                      lane=lane) for row, _, flags in ROWS[i::2]]
    side_by_side(lanes, [rows_job(0), rows_job(1)])
    for row, stage, flags in ROWS:
        rows.append(dict(name=row, **zm.demo_metrics(questions, read_results(results_files(outs[row]))[0]),
                         checkpoint=os.path.abspath(ckpts[row]), mode=flags.split()[1],
                         inquiry="--no-inquiry" not in flags, blank_crops="--blank-crops" in flags, decoding="greedy"))
        if row == "grpo":  # did RL raise its own training reward? (the "RL helps" test)
            rows[-1].update(zm.train_reward_fifths(os.path.join(root, "grpo", "log.jsonl")))
    times["eval"] = time.time() - t
    t = time.time()
    probes = {}  # the sub-skills of each stage's model, teacher-forced on the held-out split
    for stage in ("base", "look", "read", "sft", "grpo"):
        ckpt = os.path.join(root, "tiny-base") if stage == "base" else latest_checkpoint(os.path.join(root, stage))
        model, ct = rollout.load(ckpt)
        model.eval()
        probes[stage] = zm.probe_model(model, ct, bench, os.path.dirname(bench))
        own = zm.probe_perception(model, ct, os.path.join(zoom, "perception_heldout.jsonl"), zoom)  # the stages' own
        probes[stage].update(perception_ground=own["ground"], perception_read=own["read"], perception_n=own["n"])
        print(f"probes of {stage} ({ckpt}): " + ", ".join(f"{p} {zm.fmt(probes[stage][p])}%" for p in zm.PROBES) +
              f" (n={probes[stage]['n']}); the perception records' own: ground {own['ground']:.1f}%, read "
              f"{own['read']:.1f}% (n={own['n']}); visual features: spread over tokens {probes[stage]['feature_spread']:.4f}, "
              f"|mean| {probes[stage]['feature_mean']:.4f}", flush=True)
    times["probes"] = time.time() - t
    atomic_write(os.path.join(demo, "probes.json"), json.dumps(probes, indent=1) + "\n")
    atomic_write(os.path.join(demo, "results.json"), json.dumps(rows, indent=1) + "\n")
    atomic_write(os.path.join(demo, "results.md"), zm.demo_table(rows))
    print("\n" + zm.demo_table(rows) + f"\nwrote {os.path.join(demo, 'results.json')}")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; in all {(time.time() - t0) / 60:.1f} min (look and read {torch.get_num_threads()} thread(s), then "
          f"{lanes[0].threads} per script, two scripts at once; the probes {torch.get_num_threads()})")
    return rows


if __name__ == "__main__":
    main()
