"""zoom_figure4.py, paper Figure 4 in miniature: its questions say what their images show, and its
--smoke sweep trains and evaluates every encoder variant through the scripts' command lines."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import data
import zoom_figure4 as zf
import zoom_scenes as zs
from data import Budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIGURE4_VARIANTS = {"ViLaVT": ("joint", "question"), "w/o Inquiry": ("joint", "none"),
                    "w/o Multi-Image": ("per-image", "question"), "Vanilla": ("per-image", "none")}


def test_figure4_questions_say_what_their_images_show(tmp_path, tokenizer):
    """make_figure4: sft.py's loader takes every record at the training budget; the kinds and the
    answers are balanced; each answer follows from the scene, and the scene is what the pixels
    show: every dot at full ink and full size in a 168x168 eval image (readable at the training
    budget), and a card's size as drawn."""
    paths = zf.make_figure4(str(tmp_path), 32, 16)
    ct = data.ChatTokenizer(tokenizer)
    ds = data.TrajectoryDataset(paths["train"], str(tmp_path), ct, Budget(total_tokens=72))
    assert len(ds) == 32 and (ds[0]["labels"] != -100).sum() > 0
    cfg = zf.FIGURE4_WORLD
    for split, n in (("train", 32), ("eval", 16)):
        recs = [json.loads(ln) for ln in open(paths[split])]
        assert len(recs) == n and sum(r["task"] == "dots" for r in recs) == n // 2
        assert abs(sum(r["answer"] == "yes" for r in recs) - n / 2) <= n / 4
        if split == "eval":
            assert {r["side"] for r in recs} == {168}
        else:
            assert {r["side"] for r in recs} <= {s for s, _ in zf.FIGURE4_SIDES} and len({r["side"] for r in recs}) > 1
        for r in recs:
            assert r["mode"] == "direct" and r["steps"] == [{"text": f"<answer> {r['answer']} </answer>",
                                                            "answer": r["answer"]}]
            a, b = r["scene"]
            area = [(s["box"][2] - s["box"][0]) * (s["box"][3] - s["box"][1]) for s in (a, b)]
            first = a["dots"] > b["dots"] if r["task"] == "dots" else area[0] > area[1]
            assert first == (r["answer"] == "yes"), r
            if r["task"] == "size":
                assert max(area) >= 1.25 * min(area) - 1e-9
            if split == "eval":
                for s, p in zip((a, b), r["images"]):
                    px = np.asarray(Image.open(tmp_path / p).convert("RGB"))
                    assert px.shape == (168, 168, 3)
                    assert (px.max(-1) <= 60).sum() == s["dots"] * cfg.dot_size ** 2  # solid ink, nothing else that dark
                    x1, y1, x2, y2 = (round(v * 168) for v in s["box"])
                    assert tuple(px[y1 + 2, x1 + 2]) == zs.COLORS[s["color"]]  # the card's frame


def test_figure4_smoke_trains_and_sweeps_every_variant(tmp_path):
    """`python zoom_figure4.py --smoke`: each variant trained by sft.py from the same base
    with its own switches at the training budget, evaluated by eval.py at every budget with the
    same switches; results.json has a point per variant and budget; .md and .png are written. A
    second run finds everything done."""
    cmd = [sys.executable, os.path.join(ROOT, "zoom_figure4.py"), "--smoke"]
    run = lambda: subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT),  # noqa: E731
                                 capture_output=True, text=True, timeout=600)
    p = run()
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert p.stdout.count("$ python ") == 8  # sft.py and eval.py per variant
    root = tmp_path / "out" / "smoke" / "figure4"
    rows = json.load(open(root / "results.json"))
    assert [(r["variant"], r["budget_tokens"]) for r in rows] == [(v, b) for v in FIGURE4_VARIANTS for b in (72, 24)]
    for r in rows:
        assert r["n"] == 8 and 0 <= r["accuracy"] <= 100 and {"accuracy_dots", "accuracy_size"} <= set(r), r
    for v, (groups, inquiry) in FIGURE4_VARIANTS.items():
        slug = v.lower().replace("w/o ", "no_").replace("-", "_")
        meta = json.load(open(root / slug / "latest" / "meta.json"))
        assert os.path.realpath(meta["init_from"]) == os.path.realpath(root / "tiny-base")
        assert (meta["args"]["initial_groups"], meta["args"]["initial_inquiry"]) == (groups, inquiry)
        assert meta["args"]["total_visual_tokens"] == 72
        for b in (72, 24):
            lines = [json.loads(ln) for ln in open(root / "eval" / f"{slug}.direct.tok{b}.jsonl")]
            assert len(lines) == 8 and all((ln["initial_groups"], ln["initial_inquiry"], ln["max_visual_tokens"])
                                           == (groups, inquiry, b) for ln in lines)
    table = open(root / "results.md").read()
    assert all(f"| {v} |" in table for v in FIGURE4_VARIANTS) and "72 tokens" in table
    assert Image.open(root / "results.png").size == (960, 600)
    p = run()
    assert p.returncode == 0 and "$ python" not in p.stdout, p.stdout[-3000:]
