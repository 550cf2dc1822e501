"""The CPU demo (README "The demo"): its --smoke sequence end to end, as the command lines a
user types, and the results table's metrics on hand-made results lines."""

import json
import os
import subprocess
import sys

import pytest
import torch

import data
import eval as E
import grpo
import rollout
from model import ViLaVT, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["direct", "chat", "grpo", "vanilla", "no_inquiry"]
COLUMNS = ["accuracy", "mra", "format_rate", "tool_calls", "box_hit_rate", "accuracy_multi_image"]


def run(script, *flags, cwd):
    cmd = [sys.executable, os.path.join(ROOT, script), *flags]
    p = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


def test_smoke_sequence_hands_each_checkpoint_on(tmp_path):
    """sft -> grpo, sft --vanilla -> grpo --vanilla, eval: every stage runs from a clean folder
    and starts from the previous stage's final checkpoint; eval writes every row and column."""
    for script, *flags in (("sft.py",), ("grpo.py",), ("sft.py", "--vanilla"), ("grpo.py", "--vanilla"), ("eval.py",)):
        run(script, *flags, "--smoke", cwd=tmp_path)
    smoke = tmp_path / "out" / "smoke"
    real = lambda p: os.path.realpath(p)  # noqa: E731
    for v in ("", "-vanilla"):
        sft_meta = json.load(open(smoke / f"sft{v}" / "latest" / "meta.json"))
        grpo_meta = json.load(open(smoke / f"grpo{v}" / "latest" / "meta.json"))
        assert real(sft_meta["init_from"]) == real(smoke / f"tiny-base{v}") and sft_meta["step"] == 8  # 16 samples / 2
        assert real(grpo_meta["init_from"]) == real(smoke / f"sft{v}" / "latest") and grpo_meta["step"] == 2
        config = json.load(open(smoke / f"grpo{v}" / "latest" / "config.json"))
        assert (config["model_type"] == "vilavt") == (v == "")  # the vanilla pipeline has no inquiry path
    rows = json.load(open(smoke / "demo" / "results.json"))
    assert [r["name"] for r in rows] == ROWS
    expect = dict(direct="sft", chat="sft", grpo="grpo", vanilla="grpo-vanilla", no_inquiry="grpo")
    for r in rows:
        assert set(COLUMNS) <= set(r) and r["n"] == 8
        assert real(r["checkpoint"]) == real(smoke / expect[r["name"]] / "latest"), r
        assert 0 <= r["format_rate"] <= 100 and r["tool_calls"] >= 0
    assert [r["mode"] for r in rows] == ["direct", "chat", "chat", "chat", "chat"]
    assert [r["inquiry"] for r in rows] == [True, True, True, True, False]
    lines = [json.loads(ln) for ln in open(smoke / "demo" / "no_inquiry.jsonl")]
    assert len(lines) == 8 and all(ln["inquiry"] is False and all(c["query"] == "" for c in ln["crops"])
                                   for ln in lines)


def question(qid, kind, answer, category, target_boxes, options=None):
    rec = {"id": qid, "images": ["a.png"] * len(target_boxes), "question": "?", "options": options,
           "problem_type": "multiple choice" if kind == "mc" else "numerical", "answer": answer,
           "category": category, "target_boxes": target_boxes}
    return E.normalize(rec, 0)


def line(qid, response, turns, crops=(), n_images=1, mode="chat"):
    return dict(question_id=qid, response=response, mode=mode, turns=list(turns), crops=list(crops),
                image_sizes=[[168, 168]] * n_images, n_tool_calls=len([t for t in turns if "<tool>" in t]))


def test_demo_metrics_by_hand():
    box = [0.1, 0.1, 0.3, 0.2]  # the target card of image 0, normalised
    call = '<think> zoom </think>\n<tool> {"region": [{"index": 0, "bbox_2d": [0, 0, 56, 56]}], "query": "q"} </tool>'
    qs = [question("a", "mc", "B", "single", [box], ["A. 1", "B. 2"]),
          question("b", "num", "4", "multi", [box, None]),
          question("c", "num", "10", "single", [box]),
          question("d", "mc", "A", "text-only", [None], ["A. red", "B. blue"])]
    lines = {
        # right, one call whose crop (the top-left 56x56 of 168 = 0..1/3) holds the card; then a
        # crop of that crop (index 1) whose region misses it: 1 hit of 2 boxes
        "a": line("a", "<think> two </think>\n<answer> B </answer>",
                  [call, call.replace('"index": 0', '"index": 1'), "<think> two </think>\n<answer> B </answer>"],
                  [dict(index=0, region=[0, 0, 1 / 3, 1 / 3], size=[112, 112], query="q"),
                   dict(index=1, region=[0, 0, 1 / 6, 1 / 6], size=[112, 112], query="q")]),
        # multi-image, exact: counts as multi-image accuracy; no calls
        "b": line("b", "<think> four </think>\n<answer> 4 </answer>", ["<think> four </think>\n<answer> 4 </answer>"],
                  n_images=2),
        # numerical, off by 20%: MRA 0.6 (VSI-Bench thresholds), bad format (no <answer> tag closed)
        "c": line("c", "<think> x </think>\n<answer> 12 </answer>", ["<think> x </think>\n<answer> 12"]),
        "d": dict(question_id="d", response=None, error="image: missing", mode="chat"),  # failed: 0, no format
    }
    m = E.demo_metrics(qs, lines)
    assert m["accuracy"] == pytest.approx(50.0)  # a right, d failed
    assert m["mra"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert m["score"] == pytest.approx(100 * (1 + 1 + 0.6 + 0) / 4)
    assert m["format_rate"] == pytest.approx(50.0)  # a and b
    assert m["tool_calls"] == pytest.approx(2 / 4)
    assert m["box_hit_rate"] == pytest.approx(50.0) and m["n_boxes"] == 2
    assert m["accuracy_multi_image"] == pytest.approx(100.0) and m["n_multi_image"] == 1
    md = E.demo_table([dict(name="chat", **m)])
    assert md.splitlines()[2].startswith("| chat | 50.0 | 80.0 | 65.0 | 50.0 | 0.50 | 50.0 | 100.0 | 4 |")


def test_sft_grpo_and_eval_read_a_zoom_record_alike(tmp_path, tokenizer):
    """A zoom-world record is one token sequence in SFT (render_sample), GRPO (grpo.make_prompt)
    and eval (eval.make_prompt): in chat mode with the record's own system prompt and user turn,
    in direct mode with the no-tool prompt. A rollout scripted with the gold turns reproduces
    the SFT sample token for token."""
    zw = data.make_zoom_world(str(tmp_path), n_train=30, n_eval=0, seed=2)
    root, budget = zw["image_root"], zw["budget"]
    ct = data.ChatTokenizer(tokenizer)
    torch.manual_seed(0)
    model = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>"))).eval()
    model.init_weights()
    rows, _ = data.read_jsonl(zw["train"], image_root=root, need_steps=True)
    picks = {}
    for where, rec in rows:
        kind = "direct" if rec.get("mode") == "direct" else rec["category"]
        picks.setdefault(kind, (where, rec))
    assert set(picks) == {"direct", "single", "multi", "text-only"}
    for kind, (where, rec) in picks.items():
        gold = data.render_sample(rec, where, root, ct, budget)
        forced = []
        for step in rec["steps"]:
            forced += ct.encode(data.assistant_text(step)) + ([] if "tool" in step else [ct.im_end])
        q = next(x for x in E.load_bench(zw["train"]) if x["qid"] == rec["id"])
        mode = "direct" if kind == "direct" else "chat"
        imgs = data.load_originals(rec, where, root)
        t_max = 0 if mode == "direct" else rec["max_tool_calls"]
        for p in (grpo.make_prompt(where, rec, root, budget), E.make_prompt(q, imgs, mode, t_max, rec["max_pixels"])):
            traj = rollout.rollout(model, ct, [p], budget=budget, forced=[list(forced)])[0]
            assert traj.ids == gold["input_ids"].tolist(), kind
            assert traj.finish == "answer" and traj.n_tool_calls == len(rec["steps"]) - 1
