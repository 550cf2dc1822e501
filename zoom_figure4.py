"""
Paper Figure 4 in miniature (section 4.4): the dynamic encoder's controlled experiment, on a task
of the zoom world's cards.

    python zoom_figure4.py            # four encoder variants, shrinking budgets -> out/figure4/ (20 min)
    python zoom_figure4.py --smoke    # the same sweep in miniature under out/smoke/figure4/ (CI)

Four variants of the encoder, trained by sft.py from one tiny base on the same data and evaluated
by eval.py at shrinking visual-token budgets, as the paper's Figure 4 models are. Its own file
because it is a second task with its own data, models and metrics: the demo (zoom_world.py) tests
the whole method, this tests the encoder alone. It borrows the zoom world's scenes and tiny base
and its driver's stage runners (zoom_world.train, evaluate), so both run their scripts alike.
Folders under out/figure4/: data/  tiny-base/  vilavt/  no_inquiry/  no_multi_image/  vanilla/
eval/  results.json, .md, .png. Resumable as the demo is.
"""

import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

import plots
import zoom_scenes as zs
from eval import load_bench, read_results
from model import atomic_write
from training import latest_checkpoint
from zoom_metrics import ci95, pct, question_score
from zoom_scenes import COLORS
from zoom_world import SYSTEM, ZoomWorldConfig, build_once, build_tiny_base, evaluate, parse_args, train, user_turn

# -----------------------------------------------------------------------------
# the task
#
# Two images with one card each, and a yes/no question comparing the pair: does the first card carry
# more dots (fine detail, 1-6 dots; blurs as the images shrink), or is it the larger card (coarse:
# readable at any budget)? Both kinds are asked of alike images, so the inquiry has something to
# select. Comparisons, not "the same?", because a tiny model trained from random weights learns an
# order between two readings and not their equality (measured: 500 steps of 16 left "same colour?"
# and "same dot pattern?" at one constant answer). Answered directly (one <answer>, no think, no
# tools), trained at one visual-token budget and evaluated at shrinking ones, as the paper's Figure 4
# models are. Solid dots, not the demo's texture, which vanishes at once below full resolution.

FIGURE4_WORLD = ZoomWorldConfig(canvas_size=(168, 168), display_max_pixels=84 * 84, card_size=(120, 88),
                                card_border=10, dot_size=8, dot_gap=6, dot_grid=(3, 2), dot_count=(1, 6),
                                solid_marks=True, ramp=0, n_clutter=(4, 8))
FIGURE4_SCALES = (0.6, 1.0)  # a card's linear size, drawn from this range of card_size
FIGURE4_SIDES = ((168, 0.7), (140, 0.1), (112, 0.1), (84, 0.1))  # train images: both of a pair shown at one of
#   these sides (px), with these shares, as real images come in many sizes: at the training budget (36 tokens per
#   image, 168x168) each is seen at its own resolution, so the model meets every grid from 6x6 to 12x12 patches
#   (trained on 168 alone, a tiny model collapsed on smaller grids: 90% at the training budget, 33% at 40
#   tokens; on the four sides alike, it stayed at one constant answer for 1,000 steps of 16). Eval: 168x168
FIGURE4_TEXT = {"dots": "Does the first card have more dots than the second?",
                "size": "Is the first card larger than the second?"}


def _figure4_sample(rng, cfg, name, kind, side):
    """One direct-mode record and its two images, shown at side x side px: `kind` "dots" (more dots
    on the first card?) or "size" (the first card larger?), the answer yes for half of each. The
    asked property differs between the cards (dot counts by at least 1, sizes by at least 25% in
    area); the other is random."""
    r, (W, H) = 2, cfg.canvas_size
    yes = bool(rng.random() < 0.5)
    names = list(COLORS)
    counts = [int(v) for v in rng.choice(np.arange(cfg.dot_count[0], cfg.dot_count[1] + 1), 2, replace=False)]
    scales = [float(v) for v in rng.uniform(*FIGURE4_SCALES, 2)]
    while kind == "size" and max(scales) ** 2 < 1.25 * min(scales) ** 2:
        scales = [float(v) for v in rng.uniform(*FIGURE4_SCALES, 2)]
    key = counts if kind == "dots" else scales
    if (key[0] > key[1]) != yes:  # the first card wins exactly when the answer is yes
        counts, scales = (counts[::-1], scales) if kind == "dots" else (counts, scales[::-1])
    images, scene = [], []
    for count, scale in zip(counts, scales):
        w = int(round(cfg.card_size[0] * scale / r)) * r
        h = int(round(cfg.card_size[1] * scale / r)) * r
        x = int(rng.integers(cfg.cell_margin // r, (W - w - cfg.cell_margin) // r + 1)) * r
        y = int(rng.integers(cfg.cell_margin // r, (H - h - cfg.cell_margin) // r + 1)) * r
        slots = sorted(int(k) for k in rng.permutation(cfg.dot_grid[0] * cfg.dot_grid[1])[:count])
        card = dict(color=names[int(rng.integers(len(names)))], kind="dots", value=count, slots=slots, big=False,
                    box=(x, y, x + w, y + h))
        img = zs.render(rng, cfg, r, [card])
        images.append(img if side == W else img.resize((side, side * H // W), Image.BICUBIC))
        scene.append(dict(color=card["color"], dots=count, box=zs.normalised(cfg, card["box"])))
    answer = "yes" if yes else "no"
    question = FIGURE4_TEXT[kind]
    rec = {"id": name, "images": [f"images/{name}_{j}.png" for j in range(2)], "question": question,
           "answer": answer, "problem_type": "yes/no", "task": kind, "mode": "direct", "system": SYSTEM,
           "prompt": user_turn(2, question), "steps": [{"text": f"<answer> {answer} </answer>", "answer": answer}],
           "side": side, "scene": scene}
    return rec, images


def make_figure4(out_dir, n_train, n_eval, cfg=FIGURE4_WORLD, seed=0):
    """Write out_dir/{train,eval}.jsonl (direct-mode records, half of each split per question kind,
    in random order; train pairs at the sides of FIGURE4_SIDES, eval pairs at 168) and their
    images under out_dir/images/. Deterministic for a seed."""
    (w, h), lo = cfg.card_size, FIGURE4_SCALES[0]
    b, (cols, rows), s, g = cfg.card_border, cfg.dot_grid, cfg.dot_size, cfg.dot_gap
    if w + 2 * cfg.cell_margin > cfg.canvas_size[0] or h + 2 * cfg.cell_margin > cfg.canvas_size[1] or \
            cols * s + (cols - 1) * g > lo * w - 2 * b - 2 or rows * s + (rows - 1) * g > lo * h - 2 * b - 2:
        raise ValueError(f"figure 4 world: a card of {w}x{h} (down to {lo} of it), its dots and margins do not "
                         f"fit {cfg.canvas_size}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {}
    for split_id, (split, n) in enumerate((("train", n_train), ("eval", n_eval))):
        kinds = np.random.default_rng([seed, 40, split_id]).permutation(n) % 2
        sides = np.random.default_rng([seed, 41, split_id]).choice([v for v, _ in FIGURE4_SIDES], n,
                                                                   p=[p for _, p in FIGURE4_SIDES])
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for i in range(n):
                rec, images = _figure4_sample(np.random.default_rng([seed, 40, split_id, i]), cfg, f"{split}_{i:05d}",
                                              ("dots", "size")[kinds[i]],
                                              int(sides[i]) if split == "train" else cfg.canvas_size[0])
                for p, img in zip(rec["images"], images):
                    img.save(os.path.join(out_dir, p), compress_level=1)
                f.write(json.dumps(rec) + "\n")
    paths["meta"] = os.path.join(out_dir, "meta.json")
    with open(paths["meta"], "w") as f:
        json.dump({"task": "figure 4", "seed": seed, "n_train": n_train, "n_eval": n_eval, "sides": FIGURE4_SIDES,
                   "scales": FIGURE4_SCALES, "config": asdict(cfg)}, f, indent=1)
    return paths


# -----------------------------------------------------------------------------
# the variants and the presets

# The sweep: the four encoder variants of paper section 4.4 are the two
# switches of data.Initial (sft.py / eval.py --initial-groups, --initial-inquiry), each trained from
# the same ViLaVT tiny base with the same data, steps and seed, so that they differ in nothing else.
# (The paper's Vanilla is Qwen2.5-VL's own encoder; ours is ViLaVT's with both switches off, whose
# query-aware layers then see one image and no text: the same weights, attending as a vanilla ViT.)
FIGURE4_VARIANTS = (("ViLaVT", "joint", "question"), ("w/o Inquiry", "joint", "none"),
                    ("w/o Multi-Image", "per-image", "question"), ("Vanilla", "per-image", "none"))
FIGURE4_PRESETS = {
    # budgets: total visual tokens of a question's two images; training at the first, evaluation at
    # each (168x168 -> 84x84 per image, a third of the tokens at the last)
    # seed 1: the task was designed on seed 0's splits (README, "Figure 4 in miniature"), so that the
    # reported sweep is on questions no choice was made on
    "tiny": dict(world=dict(n_train=12000, n_eval=400, seed=1), budgets=(72, 56, 40, 24),
                 sft="--lr 1e-3 --vision-lr 1e-4 --global-batch 16 --epochs 1 --no-activation-checkpointing",
                 eval="--mode direct --greedy --batch-size 32 --max-turn-tokens 16 --max-new-tokens 16 "
                      "--max-context 1024"),
    "smoke": dict(world=dict(n_train=16, n_eval=8, seed=0), budgets=(72, 24),
                  sft="--lr 1e-3 --vision-lr 1e-4 --global-batch 4 --epochs 1 --no-activation-checkpointing",
                  eval="--mode direct --greedy --batch-size 8 --max-turn-tokens 16 --max-new-tokens 16 "
                       "--max-context 1024"),
}


# -----------------------------------------------------------------------------
# the sweep's table and plot: accuracy against the visual-token budget, one line per encoder variant


def figure4_point(questions, lines):
    """One point of the sweep from eval.py's results lines: accuracy in percent with its 95%
    half-width, n, and the accuracy per question kind (the records' "task": dots, size)."""
    scores = {}
    for q in questions:
        s = question_score(q, lines)
        scores.setdefault("all", []).append(s)
        scores.setdefault(q["meta"]["task"], []).append(s)
    kinds = {f"accuracy_{k}": pct(v) for k, v in sorted(scores.items()) if k != "all"}
    return dict(accuracy=pct(scores["all"]), accuracy_ci95=ci95(scores["all"]), n=len(questions), **kinds)


def figure4_table(rows):
    """Markdown: a row per variant, a column per budget (largest first): accuracy +- its 95%
    half-width, then the same per question kind."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    budgets = sorted({r["budget_tokens"] for r in rows}, reverse=True)
    at = {(r["variant"], r["budget_tokens"]): r for r in rows}
    kinds = sorted(k[len("accuracy_"):] for k in rows[0] if k.startswith("accuracy_") and k != "accuracy_ci95")
    out = []
    for title, cell in [("accuracy, all questions (± 95% interval)",
                         lambda r: f"{r['accuracy']:.1f} ± {r['accuracy_ci95']:.1f}")] + \
            [(f"accuracy, {k} questions", lambda r, k=k: f"{r['accuracy_' + k]:.1f}") for k in kinds]:
        out += [f"**{title}**", "", "| variant | " + " | ".join(f"{b} tokens" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets)]
        out += [f"| {v} | " + " | ".join(cell(at[v, b]) for b in budgets) + " |" for v in variants]
        out.append("")
    return "\n".join(out)


def figure4_plot(rows, path):
    """The sweep as the paper's Figure 4: accuracy against the budget, one line per variant."""
    series = {}
    for r in rows:
        series.setdefault(r["variant"], {})[r["budget_tokens"]] = r["accuracy"]
    plots.plot_lines(series, path, "Figure 4 in miniature: accuracy vs. visual-token budget",
                     "total visual tokens (training budget: the largest)", "accuracy (%)")


# -----------------------------------------------------------------------------
# the driver


def sweep(root, preset):
    """The Figure 4 sweep under root: data, one tiny base, each variant trained by sft.py and
    evaluated by eval.py --sweep at every budget; writes results.json ([{variant, budget_tokens,
    accuracy, n, ...}]), results.md and results.png. Resumable as the demo is."""
    t0, times = time.time(), {}
    data, budgets = os.path.join(root, "data"), preset["budgets"]
    build_once(data, dict(preset["world"], task="figure 4", sides=FIGURE4_SIDES, scales=FIGURE4_SCALES,
                          config=asdict(FIGURE4_WORLD)),
               lambda tmp: make_figure4(tmp, **preset["world"]), f"the Figure 4 task ({preset['world']})")
    base = os.path.join(root, "tiny-base")
    if not os.path.exists(os.path.join(base, "config.json")):
        build_tiny_base(base)
    bench, rows = os.path.join(data, "eval.jsonl"), []
    questions = load_bench(bench)
    times["data and base"] = time.time() - t0
    for name, groups, inquiry in FIGURE4_VARIANTS:
        t, slug = time.time(), name.lower().replace("w/o ", "no_").replace("-", "_")
        switches = f"--initial-groups {groups} --initial-inquiry {inquiry}"
        train("sft.py", base, os.path.join(data, "train.jsonl"), os.path.join(root, slug),
              f"{preset['sft']} --total-visual-tokens {budgets[0]} {switches}")
        ckpt, out = latest_checkpoint(os.path.join(root, slug)), os.path.join(root, "eval", slug + ".jsonl")
        files = [os.path.join(root, "eval", f"{slug}.direct.tok{b}.jsonl") for b in budgets]
        evaluate(ckpt, bench, out, f"{switches} --sweep {','.join(map(str, budgets))} {preset['eval']}",
                 len(questions), files)
        for b, f in zip(budgets, files):
            rows.append(dict(variant=name, budget_tokens=b, **figure4_point(questions, read_results([f])[0])))
        times[slug] = time.time() - t
    atomic_write(os.path.join(root, "results.json"), json.dumps(rows, indent=1) + "\n")
    atomic_write(os.path.join(root, "results.md"), figure4_table(rows))
    figure4_plot(rows, os.path.join(root, "results.png"))
    print("\n" + figure4_table(rows) + f"\nwrote {os.path.join(root, 'results.json')}, .md, .png")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; in all {(time.time() - t0) / 60:.1f} min ({torch.get_num_threads()} threads per process)")
    return rows


def main(argv=None):
    preset, root = parse_args(argv, "Paper Figure 4 in miniature: four encoders, shrinking budgets (README)",
                              FIGURE4_PRESETS, "figure4")
    return sweep(root, preset)


if __name__ == "__main__":
    main()
