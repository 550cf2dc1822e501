"""zoom_world.py: the synthetic task (deterministic, every record renders and covers its target,
the marks need the zoom), its tokenizer, the demo's --smoke sequence end to end as the command
lines a user types, and the results table's metrics on hand-made results lines."""

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import pixels
import tiny_tokenizer
import eval as E
import grpo
import rollout
import zoom_metrics as zm
import zoom_scenes as zs
import zoom_world as zw
from conftest import ZW_CFG
from data import Budget, ChatTokenizer, render_sample
from model import ViLaVT, tiny_config
from scripted import Scripted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["direct", "chat", "grpo", "vanilla", "no_inquiry", "blank_crops"]
COLUMNS = ["accuracy", "mra", "format_rate", "tool_calls", "box_hit_rate", "accuracy_multi_image"]


def test_smoke_runs_every_stage_from_the_previous_checkpoint(tmp_path):
    """`python zoom_world.py --smoke` from a clean folder: every stage runs through its script's
    command line and starts from the previous stage's final checkpoint; the table has every row
    and column. A second run finds every stage done and changes nothing."""
    cmd = [sys.executable, os.path.join(ROOT, "zoom_world.py"), "--smoke"]
    p = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    commands = re.findall(r"^\$ OMP_NUM_THREADS=(\d+) python (.*) >> (.*) 2>&1$", p.stdout, re.M)
    assert len(commands) == 2 + 4 + 6  # look and read once, 2 x (sft, grpo), 6 eval rows
    # the perception stages once, on the stock base, with every core; then the two pipelines side by
    # side from `read`: both start before either goes on, each writing its own log
    threads = str(torch.get_num_threads())
    assert [(n, c.split(" --data")[0], log) for n, c, log in commands[:2]] == [
        (threads, f"{ROOT}/sft.py --model out/smoke/{m}", "out/smoke/logs/perception.log")
        for m in ("tiny-base", "look/latest")]
    first = [c for n, c, log in commands[2:4]]
    assert sorted(c.split(" --data")[0] for c in first) == [f"{ROOT}/sft.py --model out/smoke/read/latest"] * 2, first
    assert sorted(c.endswith("--embedder out/smoke/tiny-embedder") for c in first) == [False, True], first
    logs = {log for n, c, log in commands}
    assert logs == {"out/smoke/logs/perception.log", "out/smoke/logs/vilavt.log", "out/smoke/logs/vanilla.log"}
    for log in logs:
        text = open(tmp_path / log).read()  # the scripts' own output, in the lane's log: sft.py's and eval.py's
        assert re.search(r"^\d+ samples \(0 bad\) \| world 1 ", text, re.M), text[-2000:]  # sft.py's summary
        assert ("| total |" in text) == (log != "out/smoke/logs/perception.log"), text[-2000:]
    for stage in ("sft.py --model out/smoke/tiny-base --data out/smoke/zoom/perception_look.jsonl",
                  "sft.py --model out/smoke/look/latest --data out/smoke/zoom/perception_read.jsonl",
                  "sft.py --model out/smoke/read/latest --data out/smoke/zoom/train_rehearse.jsonl",
                  "grpo.py --model out/smoke/sft/latest --data out/smoke/zoom/train.jsonl",
                  "eval.py --model out/smoke/grpo/step_000002"):
        assert f"{ROOT}/{stage}" in p.stdout, stage  # each stage's command line, as a user types it
    smoke = tmp_path / "out" / "smoke"
    real = lambda p: os.path.realpath(p)  # noqa: E731
    look_meta = json.load(open(smoke / "look" / "latest" / "meta.json"))
    read_meta = json.load(open(smoke / "read" / "latest" / "meta.json"))
    assert real(look_meta["init_from"]) == real(smoke / "tiny-base") and look_meta["step"] == 2  # 8 / 4
    assert real(read_meta["init_from"]) == real(smoke / "look" / "latest") and read_meta["step"] == 2
    assert json.load(open(smoke / "read" / "latest" / "config.json"))["model_type"] == "qwen2_5_vl"  # stock
    for v in ("", "-vanilla"):
        sft_meta = json.load(open(smoke / f"sft{v}" / "latest" / "meta.json"))
        grpo_meta = json.load(open(smoke / f"grpo{v}" / "latest" / "meta.json"))
        assert real(sft_meta["init_from"]) == real(smoke / "read" / "latest") and sft_meta["step"] == 10  # 20 / 2
        assert real(grpo_meta["init_from"]) == real(smoke / f"sft{v}" / "latest") and grpo_meta["step"] == 2
        config = json.load(open(smoke / f"grpo{v}" / "latest" / "config.json"))
        assert (config["model_type"] == "vilavt") == (v == "")  # the vanilla pipeline has no inquiry path
    zoom = smoke / "zoom"  # the trajectory SFT's data: the 16 trajectories and the first 4 reading-stage records
    mix = open(zoom / "train_rehearse.jsonl").readlines()
    assert sorted(mix) == sorted(open(zoom / "train.jsonl").readlines() + open(zoom / "perception_read.jsonl").readlines()[:4])
    rows = json.load(open(smoke / "demo" / "results.json"))
    assert [r["name"] for r in rows] == ROWS
    expect = dict(direct="sft", chat="sft", grpo="grpo", vanilla="grpo-vanilla", no_inquiry="grpo", blank_crops="sft")
    for r in rows:
        assert set(COLUMNS) <= set(r) and r["n"] == 8
        assert real(r["checkpoint"]) == real(smoke / expect[r["name"]] / "latest"), r
        assert 0 <= r["format_rate"] <= 100 and r["tool_calls"] >= 0
    assert [r["mode"] for r in rows] == ["direct", "chat", "chat", "chat", "chat", "chat"]
    assert [r["inquiry"] for r in rows] == [True, True, True, True, False, True]
    assert [r["blank_crops"] for r in rows] == [False] * 5 + [True]
    lines = [json.loads(ln) for ln in open(smoke / "demo" / "no_inquiry.jsonl")]
    assert len(lines) == 8 and all(ln["inquiry"] is False and all(c["query"] == "" for c in ln["crops"])
                                   for ln in lines)
    grpo_log = [json.loads(ln)["reward"] for ln in open(smoke / "grpo" / "log.jsonl")]
    assert rows[2]["train_reward_first_fifth"] == grpo_log[0] and rows[2]["train_reward_last_fifth"] == grpo_log[-1]
    probes = json.load(open(smoke / "demo" / "probes.json"))
    assert list(probes) == ["base", "look", "read", "sft", "grpo"]
    for stage in probes.values():
        assert stage["n"] >= 1 and all(0 <= stage[p] <= 100 for p in zm.PROBES if p != "option"), stage
        assert (stage["option"] is None) == (stage["n_option"] == 0), stage  # multiple-choice records only
        assert stage["perception_n"] == 4 and 0 <= stage["perception_ground"] <= 100, stage
        assert stage["feature_spread"] > 0 and stage["feature_mean"] > 0, stage
    table = open(smoke / "demo" / "results.md").read()
    assert all(f"| {r} |" in table for r in ROWS)
    before = {p: os.path.getmtime(p) for p in (smoke / "sft" / "latest" / "meta.json", smoke / "demo" / "chat.jsonl")}
    p = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "\n$ " not in p.stdout, p.stdout[-3000:]  # every stage skipped
    assert all(os.path.getmtime(p) == t for p, t in before.items())


def test_side_by_side_stops_every_lane_when_one_fails(tmp_path):
    """A lane whose script fails stops the other's running script and starts none after it; the
    failure is raised in the caller. Lanes that succeed run at once, not one after the other, the
    stopped ones too when run again."""
    py = lambda code: [sys.executable, "-c", code]  # noqa: E731
    lanes = [zw.Lane(1, str(tmp_path / "a.log")), zw.Lane(1, str(tmp_path / "b.log"))]
    with pytest.raises(subprocess.CalledProcessError) as e:
        zw.side_by_side(lanes, [lambda lane: lane.call(py("import time; time.sleep(1); raise SystemExit(3)")),
                                lambda lane: [lane.call(py("import time; time.sleep(600)")), lane.call(py("print(1)"))]])
    assert e.value.returncode == 3
    assert lanes[1].proc.returncode == -signal.SIGTERM and open(tmp_path / "b.log").read() == ""  # `print(1)` never ran
    for i, lane in enumerate(lanes):  # the same lanes, stopped by the failure above
        lane.log = str(tmp_path / f"{i}.log")
    code = "import os, time; t = time.time(); time.sleep(2); print(os.environ['OMP_NUM_THREADS'], t, time.time())"
    zw.side_by_side(lanes, [lambda lane: lane.call(py(code))] * 2)
    (n0, a0, b0), (n1, a1, b1) = [open(tmp_path / f"{i}.log").read().split() for i in range(2)]
    assert n0 == n1 == "1" and float(a0) < float(b1) and float(a1) < float(b0)  # their runs overlap


def test_perception_records_load_and_show_what_they_say(tmp_path, tokenizer):
    """make_perception: sft.py's loader takes every record; a grounding answer's cells (display
    px) hold the asked card of each image and its think names their places; a reading record's
    image is the card's cell at zoom scale, where its dots show at full contrast."""
    path = zw.make_perception(str(tmp_path), 24, name="p")
    ct = data.ChatTokenizer(tokenizer)
    ds = data.TrajectoryDataset(path, str(tmp_path), ct, zw.display_budget())
    recs = [rec for _, rec in ds.records]
    assert {r["task"] for r in recs} == {"ground", "read"} and sum(r["task"] == "read" for r in recs) == 12
    cfg = zw.ZoomWorldConfig()
    for i, rec in enumerate(recs):
        s = ds[i]
        assert (s["labels"] != -100).sum() > 0 and len(s["context"].views) == len(rec["images"])
        think, answer = rec["steps"][0]["think"], rec["steps"][0]["answer"]
        if rec["task"] == "ground":
            boxes = json.loads(answer)
            assert [b["index"] for b in boxes] == list(range(len(rec["images"])))
            for b, t in zip(boxes, rec["target_boxes"]):
                (W, H) = s["context"].views[b["index"]].display
                cell = [b["bbox_2d"][0] / W, b["bbox_2d"][1] / H, b["bbox_2d"][2] / W, b["bbox_2d"][3] / H]
                assert zm.covers(cell, t)
                assert zw._place(cfg, [v * 336 for v in t]) + f" of image {b['index']}" in think
        else:
            img = np.asarray(Image.open(tmp_path / rec["images"][0]).convert("L"))
            assert img.shape == (168, 168) and f"has {answer} dots" in think
            lo, hi = cfg.ink_levels
            assert (img <= lo + 20).sum() >= int(answer) * (cfg.dot_size // 2) ** 2  # each dot: its dark half (the ramp moves it +-16)
    n_images = lambda recs: sorted({len(r["images"]) for r in recs if r["task"] == "ground"})  # noqa: E731
    assert n_images(recs) == [1, 2, 3]  # share_multi 0.5: both kinds
    for share_multi, want in ((0.0, [1]), (1.0, [2, 3])):  # the demo's stages: single images only
        p = zw.make_perception(str(tmp_path), 24, share_read=0.0, share_multi=share_multi, name=f"m{share_multi}")
        assert n_images(rec for _, rec in data.read_jsonl(p, need_steps=True, need_answer=False)[0]) == want
    p = zw.make_perception(str(tmp_path), 24, share_read=1.0, share_mc=0.5, name="mc")
    recs = [rec for _, rec in data.read_jsonl(p, need_steps=True, need_answer=False)[0]]
    assert 0 < sum(r["options"] is not None for r in recs) < 24
    for r in recs:  # a multiple-choice reading: the think's value, then its letter among the options
        step = r["steps"][0]
        value = step["think"].split(" dots")[0].split()[-1]
        if r["options"]:
            assert f"{step['answer']}. {value}" in r["options"] and r["prompt"].endswith("\n".join(r["options"]))
            assert step["think"].endswith(f"That is option {step['answer']}.")
        else:
            assert step["answer"] == value
    # share_zoom: a reading record is a whole single-image chat instead (the gold tool call on the
    # original, the dots read on its crop), under perception/, loadable by sft.py like any record
    p = zw.make_perception(str(tmp_path), 24, share_read=0.5, share_zoom=0.5, name="zoom")
    ds = data.TrajectoryDataset(p, str(tmp_path), ct, zw.display_budget())
    recs = [rec for _, rec in ds.records]
    chats = [i for i, r in enumerate(recs) if r["task"] == "count-dots"]
    assert 0 < len(chats) < 12 and sum(r["task"] == "read" for r in recs) == 12 - len(chats)
    for i in chats:
        r, s = recs[i], ds[i]
        assert all(x.startswith("perception/zoom_") for x in r["images"]) and len(r["steps"]) == 2
        crop = s["context"].views[1]  # cut by the gold call's box: the card's cell
        assert zm.covers(crop.region, r["target_boxes"][0])
        assert f"has {r['scene'][0][0]['value']} dots" in r["steps"][1]["think"]
    # share_zoom_multi: such a chat over 2-3 originals instead, one call with a region in each (its
    # crops one encoder group), the dots of every image read in the last think
    p = zw.make_perception(str(tmp_path), 24, share_read=1.0, share_zoom=1.0, share_zoom_multi=1.0, name="multi")
    ds = data.TrajectoryDataset(p, str(tmp_path), ct, zw.display_budget())
    for i, (_, r) in enumerate(ds.records):
        n, s = len(r["scene"]), ds[i]
        assert r["category"] == "multi" and n in (2, 3) and len(r["images"]) == n and len(r["steps"]) == 2
        assert len(s["context"].views) == 2 * n  # and a crop of each, cut by the gold call
        groups = [v.group for v in s["context"].views]  # the originals one each, then the crops together
        assert len(set(groups[:n])) == n and len(set(groups[n:])) == 1 and groups[n] not in groups[:n]
        for j, (crop, cards) in enumerate(zip(s["context"].views[n:], r["scene"])):
            card = next(c for c in cards if c["color"] in r["question"].split())
            assert zm.covers(crop.region, r["target_boxes"][j]) and f"image {j}: {card['value']} dots" in r["steps"][1]["think"]
    # share_mc_multi, not share_mc, makes those chats multiple choice (default 0: the totals, numerically)
    for mc_multi in (0.0, 1.0):
        p = zw.make_perception(str(tmp_path), 8, share_read=1.0, share_mc=1.0, share_zoom=1.0, share_zoom_multi=1.0,
                               share_mc_multi=mc_multi, name=f"multi_mc{mc_multi}")
        recs = [r for _, r in data.read_jsonl(p, need_steps=True, need_answer=False)[0]]
        assert all(r["category"] == "multi" and (r["options"] is not None) == (mc_multi == 1.0) for r in recs)
    # share_colour: a grounding record is the trajectories' colour question instead, whose think
    # names the colour of the one card it shows
    p = zw.make_perception(str(tmp_path), 24, share_read=0.0, share_colour=1.0, name="colour")
    for _, r in data.read_jsonl(p, need_steps=True, need_answer=False)[0]:
        (card,) = r["scene"][0]
        assert r["task"] == "largest-color" and len(r["images"]) == 1 and len(r["steps"]) == 1
        assert f"and it is {card['color']}." in r["steps"][0]["think"] and f"{r['answer']}. {card['color']}" in r["options"]


def test_stock_tiny_base_plus_tiny_embedder_is_the_tiny_vilavt(tmp_path):
    """The demo's ViLaVT is built as at 7B (`sft.py --model stock --embedder folder`): from the stock
    tiny base and build_tiny_embedder's folder it gets model.tiny_config's ViLaVT schedule (full
    layer 3, query-aware 4-7), the stock weights as saved, and the embedder's weights as its
    inquiry encoder. transformers' Qwen3Model, the oracle, reads the embedder folder and gives
    the same last_hidden_state as our encoder."""
    from safetensors.torch import load_file
    from transformers import Qwen3Model
    base, emb = str(tmp_path / "base"), str(tmp_path / "emb")
    zw.build_tiny_base(base, vanilla=True)
    zw.build_tiny_embedder(emb)
    stock = ViLaVT.from_pretrained(base)
    m = ViLaVT.from_pretrained(base, emb)
    tiny = tiny_config(m.cfg.lm.vocab_size, m.cfg.lm.image_token_id)
    assert stock.cfg.vision.fullatt_block_indexes == (3, 7) and stock.cfg.vision.query_layers == ()
    assert (m.cfg.vision.fullatt_block_indexes, m.cfg.vision.query_layers) == (
        tiny.vision.fullatt_block_indexes, tiny.vision.query_layers)
    sd = m.state_dict()
    assert set(sd) == set(ViLaVT(tiny).state_dict())
    assert all(torch.equal(sd[k], v) for k, v in stock.state_dict().items())
    saved = load_file(os.path.join(emb, "model.safetensors"))
    assert saved and all(torch.equal(sd["text_encoder." + k], v) for k, v in saved.items())
    ids = torch.randint(0, m.cfg.lm.vocab_size, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ref = Qwen3Model.from_pretrained(emb, dtype=torch.float32).eval()
    with torch.no_grad():
        want_h, got_h = ref(input_ids=ids, attention_mask=mask).last_hidden_state, m.text_encoder(ids, mask)
    assert torch.allclose(got_h[mask.bool()], want_h[mask.bool()], atol=1e-5), (got_h - want_h).abs().max()


def test_tiny_preset_sft_learns(tmp_path, tokenizer):
    """The tiny preset's SFT flags, cut short (--max-steps 80) on a smaller zoom world: the loss
    falls. The full run is in the README."""
    import sft
    base, zoom = str(tmp_path / "base"), str(tmp_path / "zoom")
    zw.build_tiny_base(base)
    zw.make_world(zoom, n_train=48, n_eval=0)
    threads = torch.get_num_threads()
    try:
        sft.main(["--model", base, "--data", os.path.join(zoom, "train.jsonl"), "--out-dir", str(tmp_path / "sft"),
                  *zw.PRESETS["tiny"]["sft"].split(), "--max-steps", "80", "--save-every", "1000"])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "sft" / "log.jsonl") as f:
        curve = [json.loads(ln)["loss"] for ln in f]
    assert len(curve) == 80 and sum(curve[-3:]) / 3 < 0.7 * curve[0], curve


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
    m = zm.demo_metrics(qs, lines)
    assert m["accuracy"] == pytest.approx(50.0)  # a right, d failed
    assert m["mra"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert m["score"] == pytest.approx(100 * (1 + 1 + 0.6 + 0) / 4)
    assert m["format_rate"] == pytest.approx(50.0)  # a and b
    assert m["tool_calls"] == pytest.approx(2 / 4)
    assert m["box_hit_rate"] == pytest.approx(50.0) and m["n_boxes"] == 2
    assert m["accuracy_multi_image"] == pytest.approx(100.0) and m["n_multi_image"] == 1
    # 95% half-widths, 1.96 sd / sqrt(n) by hand: MC [1, 0] and boxes [1, 0]: sd 0.5, n 2; all [1, 1, 0.6, 0]:
    # sd sqrt(2.36 / 4 - 0.65^2), n 4
    assert m["accuracy_ci95"] == pytest.approx(196 * 0.5 / 2 ** 0.5) == m["box_hit_rate_ci95"]
    assert m["score_ci95"] == pytest.approx(196 * (2.36 / 4 - 0.65 ** 2) ** 0.5 / 2)
    md = zm.demo_table([dict(name="chat", **m)])
    assert md.splitlines()[2].startswith("| chat | 50.0 ± 69.3 | 80.0 | 65.0 ± 40.1 | 50.0 | 0.50 | 50.0 ± 69.3 | 100.0 | 4 |")


def test_sft_grpo_and_eval_read_a_zoom_record_alike(tmp_path, tokenizer):
    """A zoom-world record is one token sequence in SFT (render_sample), GRPO (grpo.make_prompt)
    and eval (eval.make_prompt): in chat mode with the record's own system prompt and user turn,
    in direct mode with the no-tool prompt. A rollout scripted with the gold turns reproduces
    the SFT sample token for token."""
    world = zw.make_world(str(tmp_path), n_train=30, n_eval=0, seed=2)
    root, budget = world["image_root"], world["budget"]
    ct = data.ChatTokenizer(tokenizer)
    torch.manual_seed(0)
    model = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>"))).eval()
    model.init_weights()
    rows, _ = data.read_jsonl(world["train"], image_root=root, need_steps=True)
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
        q = next(x for x in E.load_bench(world["train"]) if x["qid"] == rec["id"])
        mode = "direct" if kind == "direct" else "chat"
        imgs = data.load_originals(rec, where, root)
        t_max = 0 if mode == "direct" else rec["max_tool_calls"]
        for p in (grpo.make_prompt(where, rec, root, budget), E.make_prompt(q, imgs, mode, t_max, rec["max_pixels"])):
            traj = rollout.rollout(Scripted(model, [forced]), ct, [p], budget=budget)[0]
            assert traj.ids == gold["input_ids"].tolist(), kind
            assert traj.finish == "answer" and traj.n_tool_calls == len(rec["steps"]) - 1


# -----------------------------------------------------------------------------
# the task


def test_build_tokenizer_is_deterministic_byte_level_and_compact(tmp_path):
    a = zw.build_tokenizer(str(tmp_path / "a"))
    zw.build_tokenizer(str(tmp_path / "b"))
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert len(a) <= 1024
    for t in tiny_tokenizer.SPECIAL_TOKENS:
        i = a.convert_tokens_to_ids(t)
        assert i != a.unk_token_id and a.convert_ids_to_tokens(i) == t
        assert a.encode(t, add_special_tokens=False) == [i]  # one token, never split
    assert a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"
    text = "héllo wörld 世界 \t\r\n 😀 ~`|"
    assert a.decode(a.encode(text)) == text  # byte-level: anything encodes and round-trips
    assert len(a.encode(data.SYSTEM_PROMPT)) < len(data.SYSTEM_PROMPT) / 3  # merges learnt from the prompts
    assert a.encode("2024", add_special_tokens=False) == [a.convert_tokens_to_ids(c) for c in "2024"]  # Qwen: digit by digit


# -----------------------------------------------------------------------------
# zoom world

def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_zoom_world_is_deterministic(tmp_path):
    a = zw.make_world(str(tmp_path / "a"), n_train=6, n_eval=2, seed=5)
    b = zw.make_world(str(tmp_path / "b"), n_train=6, n_eval=2, seed=5)
    zw.make_world(str(tmp_path / "c"), n_train=6, n_eval=2, seed=6)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert a["budget"] == b["budget"] == Budget(max_pixels=168 * 168, crop_max_pixels=168 * 168)
    assert json.load(open(a["meta"]))["budget"] == dataclasses.asdict(a["budget"])


def test_zoom_world_records_check_render_and_cover_their_targets(zoom_world, tokenizer):
    ct = ChatTokenizer(tokenizer)
    root, budget = zoom_world["image_root"], zoom_world["budget"]
    recs = []
    for split in ("train", "eval"):
        rows, n_bad = data.read_jsonl(zoom_world[split], image_root=root, need_steps=True)
        assert n_bad == 0
        recs += [rec for _, rec in rows]
    n_calls = n_direct = 0
    for rec in recs:
        assert rec["category"] in ("single", "multi", "text-only")
        assert len(rec["target_boxes"]) == len(rec["images"]) and rec["max_pixels"] == 168 * 168
        if rec["problem_type"] == "multiple choice":
            letters = [o[0] for o in rec["options"]]
            assert rec["answer"] in letters and rec["steps"][-1]["answer"] == rec["answer"]
        else:
            assert rec["options"] is None and rec["answer"].isdigit()
        s = render_sample(rec, rec["id"], root, ct, budget)
        ctx = s["context"]
        n_orig = len(rec["images"])
        assert [v.display for v in ctx.views[:n_orig]] == [(168, 168)] * n_orig  # 36 tokens each
        for view in ctx.views[n_orig:]:  # every gold crop covers its target card
            tx1, ty1, tx2, ty2 = rec["target_boxes"][view.source]
            x1, y1, x2, y2 = view.region
            assert x1 <= tx1 + 1e-9 and y1 <= ty1 + 1e-9 and x2 >= tx2 - 1e-9 and y2 >= ty2 - 1e-9, rec["id"]
            n_calls += 1
        if rec["category"] == "text-only":
            assert len(rec["steps"]) == 1 and "tool" not in rec["steps"][0]
        if rec["task"] == "largest-color":  # the target is the one largest card, the answer its colour
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            cards = sorted(rec["scene"][0], key=lambda c: -area(c["box"]))
            assert area(cards[0]["box"]) > 2 * area(cards[1]["box"]) and cards[0]["box"] == rec["target_boxes"][0]
            assert rec["options"][ord(rec["answer"]) - 65] == f"{rec['answer']}. {cards[0]['color']}"
        values = [next((c["value"] for c in cards if c["box"] == t), None) for cards, t in
                  zip(rec["scene"], rec["target_boxes"])]  # the target cards' marks, from the scene
        gold = rec["answer"] if rec["options"] is None else rec["options"][ord(rec["answer"]) - 65][3:]
        if rec["category"] == "single":
            assert gold == str(values[0])
        if rec["task"] == "total":
            assert gold == str(sum(values))
        if rec["task"] == "which-image":
            assert str(values[int(gold.split()[-1])]) in rec["question"] and len(set(values)) == len(values)
        for j, cards in enumerate(rec["scene"]):  # one card per colour; cards never overlap
            assert len({c["color"] for c in cards}) == len(cards)
            for a in cards:
                for b in cards:
                    assert a is b or a["box"][2] <= b["box"][0] or b["box"][2] <= a["box"][0] or \
                        a["box"][3] <= b["box"][1] or b["box"][3] <= a["box"][1]
        if rec.get("mode") == "direct":  # the no-tool share of the train split: one answer step
            assert rec["id"].startswith("train") and len(rec["steps"]) == 1 and "tool" not in rec["steps"][0]
            assert "system" not in rec and data.DIRECT_INSTRUCTIONS in s["text"]
            n_direct += 1
            continue
        assert rec["system"] == zw.SYSTEM and s["text"].startswith(f"<|im_start|>system\n{zw.SYSTEM}")
        if rec["category"] == "multi":
            regions = rec["steps"][0]["tool"]["region"]
            assert sorted(r["index"] for r in regions) == list(range(n_orig)) and n_orig >= 2
            assert len(set(s["image_to_query"][n_orig:].tolist())) == 1  # crops of several images: one group
        if rec["task"].endswith("zoom2"):  # a crop of a crop
            assert rec["steps"][1]["tool"]["region"][0]["index"] == n_orig
            assert ctx.views[-1].parent == n_orig
    assert n_calls > 30 and n_direct == round(ZW_CFG.share_direct * 40)


def test_zoom_world_shares(zoom_world):
    recs = [rec for _, rec in data.read_jsonl(zoom_world["train"])[0]]
    n = len(recs)
    cat = lambda c: [r for r in recs if r["category"] == c]  # noqa: E731
    assert abs(len(cat("text-only")) / n - ZW_CFG.share_text_only) < 0.03
    assert abs(len(cat("multi")) / (n - len(cat("text-only"))) - ZW_CFG.share_multi) < 0.05
    assert abs(sum(r["problem_type"] == "multiple choice" for r in recs) / n - ZW_CFG.share_mc) < 0.05
    zoom2 = [r for r in cat("single") if r["task"].endswith("zoom2")]
    assert abs(len(zoom2) / len(cat("single")) - ZW_CFG.share_crop_of_crop) < 0.05
    assert {r["mark"] for r in recs} == {"dots", "digit"}
    meta = json.load(open(zoom_world["meta"]))
    assert sum(meta["counts"]["train"].values()) == n and meta["budget"]["max_pixels"] == 168 * 168


@pytest.mark.parametrize("cfg, box, other, slots, off_grid", [
    # the tests' 3x3 world of small cards; 40x30 display px around the card: the 80x60 crop is resampled to 84x56
    (ZW_CFG, (120, 128, 184, 168), (240, 240, 304, 280), ([0, 1], [0, 2, 3, 5, 7]), [55, 59, 95, 89]),
    # the demo's world (the defaults): big cards, big dots, the colour ramp; a 50x38 display px zoom
    (zw.ZoomWorldConfig(), (24, 40, 104, 96), (200, 200, 280, 256), ([0, 1], [0, 1, 2, 4, 5]), [7, 15, 57, 53])])
def test_zoom_world_marks_need_the_zoom(cfg, box, other, slots, off_grid):
    """The honest resolution check. Two scenes identical but for the target card's mark (2 vs 5
    dots; digits 3 vs 8, which differ in just two font cells). At the display the model gets
    for the original (BICUBIC to 168x168, as preprocess_image does), the card images differ by
    at most a few grey levels (rounding, bicubic tails at mark corners). After the gold zoom
    (crop rule + smart_resize), they differ by ~100 levels; also after an off-grid zoom whose
    crop smart_resize has to resample."""
    Wd, Hd, r = zs.geometry(cfg)
    budget = zw.display_budget(cfg)

    def scene(kind, value, slots):
        target = {"color": "red", "kind": kind, "value": value, "slots": slots, "big": False, "box": box}
        blue = {"color": "blue", "kind": "dots", "value": 2, "slots": [0, 5], "big": False, "box": other}
        return zs.render(np.random.default_rng(7), cfg, r, [target, blue])

    def card_diff(a, b, box):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        d = np.abs(a.astype(float) - b.astype(float))[y1:y2, x1:x2]
        return d.mean(), d.max()

    def shown(img, bbox=None):  # what the model sees: the display, or a crop at its display size
        if bbox is None:
            return np.asarray(img.resize((Wd, Hd), Image.Resampling.BICUBIC)), (0, 0, 1, 1), (Wd, Hd)
        crop, region = pixels.crop_image(img, (0, 0, 1, 1), (Wd, Hd), bbox)
        h, w = pixels.smart_resize(crop.height, crop.width, pixels.FACTOR, pixels.MIN_PIXELS, budget.for_crops())
        return np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC)), region, (w, h)

    card = tuple(v / 336 for v in box)
    gold = zs.cells_bbox(cfg, (Wd, Hd, r), zs.cell(cfg, box))
    for kind, (va, sa), (vb, sb) in [("dots", (2, slots[0]), (5, slots[1])), ("digit", (3, None), (8, None))]:
        if kind not in cfg.mark_kinds:  # the demo's world draws dots only
            continue
        A, B = scene(kind, va, sa), scene(kind, vb, sb)
        a, _, _ = shown(A)
        b, _, _ = shown(B)
        mean0, max0 = card_diff(a, b, [card[0] * Wd, card[1] * Hd, card[2] * Wd, card[3] * Hd])
        assert np.abs(a.astype(float) - b.astype(float)).max() <= 4  # the whole display image
        assert mean0 < 0.5 and max0 <= 4, (kind, mean0, max0)
        for bbox, floor in ((gold, 90), (off_grid, 40)):
            a, region, disp = shown(A, bbox)
            b, _, _ = shown(B, bbox)
            mean1, max1 = card_diff(a, b, zs.in_display(card, region, disp))
            assert max1 >= floor and max1 >= 10 * max0 and mean1 > 5 * mean0, (kind, bbox, mean0, mean1, max1)
    assert (gold[2] - gold[0]) % 14 == 0 and (gold[3] - gold[1]) % 14 == 0  # gold crops: no resampling


def test_default_zoom_world_boxes_are_the_named_cells(tmp_path):
    """The demo's default world (2x2 grid): every gold box is the cell the think names for that
    image, and it holds the target card."""
    import re
    world = zw.make_world(str(tmp_path), n_train=30, n_eval=0)
    cells = {"in the top left": [0, 0, 84, 84], "in the top right": [84, 0, 168, 84],
             "in the bottom left": [0, 84, 84, 168], "in the bottom right": [84, 84, 168, 168]}
    n = 0
    for _, rec in data.read_jsonl(world["train"])[0]:
        if "tool" not in rec["steps"][0]:
            continue
        named = {int(i): p for p, i in re.findall(r"(in the \w+ \w+) of image (\d)", rec["steps"][0]["think"])}
        for r in rec["steps"][0]["tool"]["region"]:
            assert r["bbox_2d"] == cells[named[r["index"]]], rec["id"]
            t = [v * 168 for v in rec["target_boxes"][r["index"]]]
            x1, y1, x2, y2 = r["bbox_2d"]
            assert x1 <= t[0] and y1 <= t[1] and t[2] <= x2 and t[3] <= y2
            n += 1
        assert rec["prompt"] == "<image>" * len(rec["images"]) + data.format_question(rec["question"], rec["options"])
    assert n >= 15


# -----------------------------------------------------------------------------
# the scripts know nothing of the demo


@pytest.mark.parametrize("script", ["sft", "grpo", "eval"])
def test_scripts_know_nothing_of_the_demo(script, capsys):
    """Their --help shows the paper's setting and no demo flag; no script imports another script
    or the demo (scripts import the library; zoom_world.py runs them as a user does)."""
    mod = __import__(script)
    with pytest.raises(SystemExit):
        (mod.build_parser().parse_args if script == "eval" else mod.parse_args)(["--help"])
    text = capsys.readouterr().out
    assert "--model" in text and not any(w in text for w in ("--smoke", "--vanilla", "demo", "tiny", "zoom"))
    with open(os.path.join(ROOT, script + ".py")) as f:
        imports = [ln.split()[1] for ln in f if ln.startswith(("import ", "from "))]
    assert not {"sft", "grpo", "eval", "bench", "zoom_world"} & set(imports), imports


def test_probes_swap_one_slot_and_score_it(tmp_path):
    """probe_candidates: one candidate is the gold record, the others differ from it only in the
    probed step's think, at the probed value. slot_scores equals, per candidate, the log-probs of
    the differing tokens read off a plain full forward of that candidate alone."""
    from rollout import load
    world = zw.make_world(str(tmp_path / "zoom"), n_train=0, n_eval=12)
    zw.build_tiny_base(str(tmp_path / "base"))
    model, ct = load(str(tmp_path / "base"))
    recs = [rec for _, rec in data.read_jsonl(world["eval"])[0] if zm.probe_candidates(rec)]
    assert recs and all(r["category"] == "single" for r in recs)
    mc = next(r for r in recs if r["options"])
    assert {r["id"] for r in recs if "option" in zm.probe_candidates(r)} == {r["id"] for r in recs if r["options"]}
    assert [c["steps"][-1]["think"][-2] for c in zm.probe_candidates(mc)["option"][0]] == list("ABCD")
    for rec in recs[:2] + [mc]:
        for probe, (cands, gold) in zm.probe_candidates(rec).items():
            assert cands[gold] == rec, probe
            k = 0 if probe not in ("reading", "option") else len(rec["steps"]) - 1
            for c in cands:
                assert [s for j, s in enumerate(c["steps"]) if j != k] == [s for j, s in enumerate(rec["steps"]) if j != k]
            assert len({c["steps"][k]["think"] for c in cands}) == len(cands)
            samples = [data.render_sample(c, "x", world["image_root"], ct) for c in cands]
            got = zm.slot_scores(model, samples)
            ids = [s["input_ids"].tolist() for s in samples]
            pre = next(i for i in range(len(ids[0])) if len({x[i] for x in ids}) > 1)
            suf = next(i for i in range(len(ids[0])) if len({x[len(x) - 1 - i] for x in ids}) > 1)
            for s, row, g in zip(samples, ids, got):
                with torch.no_grad():
                    logp = model(s["input_ids"][None], s["pixel_values"], s["grid_thw"], s["query_ids"],
                                 s["query_mask"], s["image_to_query"])[0].log_softmax(-1)
                want = sum(logp[t - 1, row[t]] for t in range(pre, len(row) - suf))
                assert abs(float(g) - float(want)) < 1e-4, (probe, float(g), float(want))
