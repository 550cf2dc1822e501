"""sft.py on CPU: distributed parity (torchrun, 2 ranks on gloo, vs 1 process), exact resume after a
kill mid-save, the release importer, stock + embedder with the freeze flags (the zoom world's tiny
preset learning is in test_zoom_world.py). Single-process runs call
sft.main in this process (same code path as `python sft.py`, without the interpreter start-up)."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sft
import training
import zoom_world
from model import ViLaVT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "sft.py")
STEPS = 5


def run(args, cwd):
    """`python sft.py ARGS` in this process (saves the interpreter start-up of a subprocess)."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        sft.main([str(a) for a in args])
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)  # (main sets one thread per CPU process)
        torch.set_rng_state(rng)


def torchrun(args, cwd, nproc):
    """`torchrun --nproc_per_node NPROC sft.py ARGS` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SFT, *args]
    p = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "log steps must be 1..n, no repeats"
    return [r["loss"] for r in rows]


def rel_diff(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model and 20 zoom-world trajectories (one epoch = 5 steps of 4), one of them
    made longer than --max-length, so the runs also drop a sample and fill its slot."""
    root = tmp_path_factory.mktemp("sft")
    base, zoom = str(root / "base"), str(root / "zoom")
    zoom_world.build_tiny_base(base)
    zoom_world.make_world(zoom, n_train=19, n_eval=0, seed=1)
    with open(os.path.join(zoom, "train.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    long = dict(recs[0], question=recs[0]["question"] + " " + "0123456789" * 300)  # ~3000 more tokens
    if "prompt" in long:  # the zoom world's own user turn holds the question too
        long["prompt"] += " " + "0123456789" * 300
    recs.append(long)
    with open(os.path.join(zoom, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    train = os.path.join(zoom, "train.jsonl")
    args = ["--model", base, "--data", train, "--global-batch", "4",
            "--max-steps", str(STEPS), "--lr", "2e-3", "--max-length", "2000", "--num-workers", "0"]
    return dict(root=root, base=base, train=train, args=args)


@pytest.fixture(scope="module")
def baseline(world):
    """The uninterrupted 1-process run every other run is compared with."""
    out = str(world["root"] / "baseline")
    run(world["args"] + ["--out-dir", out, "--no-activation-checkpointing"], cwd=world["root"])
    return out


def final_weights(out_dir, step=STEPS):
    return load_file(os.path.join(out_dir, f"step_{step:06d}", "model.safetensors"))


def log_rows(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_ranks_match_one(world, baseline):
    # 2 ranks x 2 samples vs 1 rank x 4 (same global batch of 4): the loss is the token-weighted
    # mean over the global batch, so the curves agree. Activation checkpointing on here, off in
    # the baseline: it must not change the numbers either. The baseline runs the default
    # --micro-batch-tokens (a step's 4 samples in 1 or 2 forwards: cut where that saves more than
    # training.FORWARD_COST padded tokens); this run's steps 1-3 take 1000
    # (a rank's 2 samples share a forward when both are under 500 tokens, the dropped sample's
    # dummy included, and a rank whose pair does not fit makes the other rank split its pair), its
    # steps 4-5 one sample per forward: the flag is not a resume key, it changes no number.
    # The 2-rank run is cut after step 3 and resumed: its sharded optimizer state round-trips.
    out = str(world["root"] / "two_ranks")
    torchrun(world["args"] + ["--out-dir", out, "--activation-checkpointing", "--stop-at-step", "3",
                              "--micro-batch-tokens", "1000"], cwd=world["root"], nproc=2)
    assert sorted(os.listdir(os.path.join(out, "step_000003", "optim"))) == [
        "rank00000-of-00002.safetensors", "rank00001-of-00002.safetensors"]
    with pytest.raises(SystemExit, match="world size"):  # per-rank shards: resume on the world size that saved them
        run(world["args"] + ["--out-dir", out, "--activation-checkpointing", "--resume"], cwd=world["root"])
    torchrun(world["args"] + ["--out-dir", out, "--activation-checkpointing", "--resume", "--micro-batch-tokens", "0"],
             cwd=world["root"], nproc=2)
    a, b = losses(out), losses(baseline)
    assert len(a) == STEPS and rel_diff(a, b) <= 1e-4, (a, b)
    rows, base = log_rows(out), log_rows(baseline)
    assert sum(r["skipped"] for r in rows) == 1  # the overlong sample, dropped once
    assert [r["forwards"] for r in base] == [1, 2, 1, 1, 2]
    assert min(r["forwards"] for r in rows[:3]) == 1 and [r["forwards"] for r in rows[3:]] == [2, 2]
    assert rel_diff([r["grad_norm"] for r in rows], [r["grad_norm"] for r in base]) <= 1e-4
    # the weights: each tensor's difference is under a thousandth of how far training moved it (not an
    # element-wise bound: Adam turns the float noise of a near-zero gradient, as a rarely seen token's
    # embedding row gets, into a step of up to lr, so one such row differed by 2.3e-4 at 2 threads,
    # 7% of its change; the worst tensor's ratio there is 4.7e-4, and a lost optimizer state is ~0.1)
    wa, wb, w0 = final_weights(out), final_weights(baseline), load_file(os.path.join(world["base"], "model.safetensors"))
    assert wa.keys() == wb.keys()
    frozen = {k for k in wb if torch.equal(wb[k], w0[k])}  # the text encoder: unchanged in both runs
    assert frozen and all(torch.equal(wa[k], w0[k]) for k in frozen)
    ratio = {k: ((wa[k] - wb[k]).norm() / (wb[k] - w0[k]).norm()).item() for k in wb.keys() - frozen}
    assert max(ratio.values()) < 1e-3, sorted(ratio.items(), key=lambda kv: kv[1])[-3:]


def test_any_micro_batch_size_gives_the_same_gradients(world, monkeypatch):
    """--micro-batch-tokens N: a step's samples grouped by length into right-padded
    micro-batches (one vision-encoder call, one LM forward each) give every step the gradient of
    one sample per forward (N = 0): N = 1000 (2-3 forwards of 1-3 samples; step 1 holds the
    dropped sample's dummy), the default and 10**6 (1 or 2 forwards: the budget does not bind,
    the padding a cut saves against a forward's cost decides). lr 0 keeps the weights,
    so each of the 5 steps compares a different batch at the same point."""
    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def capture(params, *a, **k):  # the full gradient of every step, before clipping
        grads.append([None if p.grad is None else getattr(p.grad, "full_tensor", lambda: p.grad)().clone()
                      for p in params])
        return clip(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    res = {}
    for n in ("0", "1000", None, "1000000"):
        grads.clear()
        out = str(world["root"] / f"micro_{n}")
        run(world["args"] + ["--out-dir", out, "--no-activation-checkpointing", "--lr", "0", "--save-every", "0"]
            + (["--micro-batch-tokens", n] if n else []), cwd=world["root"])
        res[n] = log_rows(out), list(grads)
    rows, ref = res["0"]
    assert len(ref) == STEPS and [r["forwards"] for r in rows] == [4] * STEPS and rows[0]["skipped"] == 1
    assert [r["forwards"] for r in res[None][0]] == [r["forwards"] for r in res["1000000"][0]] == [1, 2, 1, 1, 2]
    assert all(1 <= r["forwards"] <= 3 for r in res["1000"][0]) and any(r["forwards"] > 1 for r in res["1000"][0])
    scale = max(g.abs().max().item() for step in ref for g in step if g is not None)
    for n in ("1000", None, "1000000"):
        assert rel_diff([r["loss"] for r in res[n][0]], [r["loss"] for r in rows]) <= 1e-5, n
        for s, (got, want) in enumerate(zip(res[n][1], ref, strict=True)):
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                assert (g is None) == (w is None) and (w is None or (g - w).abs().max() <= 1e-5 * scale), (n, s, i)


def test_killed_mid_save_then_resume_is_exact(world, baseline, monkeypatch):
    # Run 5 steps with a checkpoint every 2; the save at step 4 dies after rank 0 wrote the
    # weights into the temp dir, before the optimizer shards. `latest` must still name step 2,
    # which must load; --resume from it redoes steps 3..5 exactly as the uninterrupted run.
    out = str(world["root"] / "killed")
    calls, save_optimizer = [], training.save_optimizer

    def save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-save")
        return save_optimizer(*a, **k)

    monkeypatch.setattr(training, "save_optimizer", save)
    args = world["args"] + ["--out-dir", out, "--no-activation-checkpointing", "--save-every", "2"]
    with pytest.raises(RuntimeError, match="simulated crash mid-save"):
        run(args, cwd=world["root"])
    monkeypatch.undo()
    assert os.path.exists(os.path.join(out, ".tmp-step_000004", "model.safetensors"))  # a partial save
    assert not os.path.exists(os.path.join(out, "step_000004"))
    assert os.readlink(os.path.join(out, "latest")) == "step_000002"
    ckpt = os.path.join(out, "latest")  # the link is a model folder itself
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 2 and meta["data_position"] == 8
    ViLaVT.from_pretrained(ckpt)  # a complete HF folder
    assert os.path.isdir(os.path.join(ckpt, "query_tokenizer")) and os.path.isdir(os.path.join(ckpt, "optim"))
    with pytest.raises(SystemExit, match="--resume"):  # never silently restart over an existing run
        run(args, cwd=world["root"])
    # --resume reads tensors and JSON only: a pickle planted where torch.distributed.checkpoint kept
    # its (pickled) metadata is never opened, so its payload never runs
    marker = world["root"] / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(os.path.join(ckpt, "optim", ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    run(args + ["--resume"], cwd=world["root"])
    assert not marker.exists()
    assert losses(out) == losses(baseline)
    wa, wb = final_weights(out), final_weights(baseline)
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    assert not os.path.exists(os.path.join(out, ".tmp-step_000004"))
    # a resume past the end (the run is at step 5, --stop-at-step 3) stops at once, changing nothing
    run(args + ["--resume", "--stop-at-step", "3"], cwd=world["root"])
    assert losses(out) == losses(baseline) and os.readlink(os.path.join(out, "latest")) == "step_000005"
    # a truncated optimizer shard, and tokenizer files missing or unreadable, are named
    shard = os.path.join(out, "latest", "optim", "rank00000-of-00001.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="step_000005/optim/rank00000-of-00001.safetensors: unreadable optimizer"):
        run(args + ["--resume"], cwd=world["root"])
    tok = os.path.join(out, "latest", "tokenizer.json")
    with open(tok, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="unreadable tokenizer files"):
        run(args + ["--resume"], cwd=world["root"])
    os.remove(tok)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        run(args + ["--resume"], cwd=world["root"])


def test_resume_takes_the_newest_complete_checkpoint_and_never_overwrites(world, baseline):
    """`latest` dangling (its step folder removed): --resume continues from the newest complete
    step folder, exactly; a run without --resume on a folder that holds a run is refused, and so
    is --resume on one that holds a run but no complete checkpoint (it once retrained from step 0
    over the log and the checkpoints)."""
    out = str(world["root"] / "dangling")
    args = world["args"] + ["--out-dir", out, "--no-activation-checkpointing", "--save-every", "2"]
    run(args + ["--stop-at-step", "4"], cwd=world["root"])
    shutil.rmtree(os.path.join(out, "step_000004"))  # `latest` -> step_000004 now dangles
    with pytest.raises(SystemExit, match="already holds a run"):
        run(args, cwd=world["root"])
    run(args + ["--resume"], cwd=world["root"])  # from step_000002
    assert losses(out) == losses(baseline)
    assert all(torch.equal(a, b) for a, b in zip(final_weights(out).values(), final_weights(baseline).values()))
    for d in os.listdir(out):
        if d.startswith("step_"):
            os.remove(os.path.join(out, d, "meta.json"))  # no complete checkpoint left
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        run(args + ["--resume"], cwd=world["root"])
    assert len(losses(out)) == STEPS  # the log is untouched


def test_initial_encoding_reaches_every_sample_and_pins_the_run(world, baseline, monkeypatch, capsys):
    """--initial-groups joint --initial-inquiry question (data.Initial, section 4.4's single pass):
    every sample is rendered with them, the loss differs from the plain run's from step 1 (the
    originals' features differ), and --resume refuses to change them; a checkpoint older than
    the flags resumes, naming them."""
    import data
    seen, real = [], data.render_sample
    monkeypatch.setattr(data, "render_sample", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    out = str(world["root"] / "joint")
    plain = world["args"] + ["--out-dir", out, "--no-activation-checkpointing"]
    run(plain + ["--initial-groups", "joint", "--initial-inquiry", "question", "--stop-at-step", "1"], cwd=world["root"])
    assert len(seen) >= 4 and set(seen) == {data.Initial(joint=True, inquiry=True)}
    assert len(losses(out)) == 1 and abs(losses(out)[0] - losses(baseline)[0]) > 1e-6
    with pytest.raises(SystemExit, match="--initial-groups 'joint' -> 'per-image'"):
        run(plain + ["--resume"], cwd=world["root"])
    # a checkpoint written before these flags existed resumes, and says which flags it predates
    meta_path = os.path.join(out, "step_000001", "meta.json")
    meta = json.load(open(meta_path))
    for k in ("initial_groups", "initial_inquiry", "vision_lr"):
        meta["args"].pop(k)
    json.dump(meta, open(meta_path, "w"))
    run(plain + ["--initial-groups", "joint", "--initial-inquiry", "question", "--resume"], cwd=world["root"])
    assert "predates --vision-lr None, --initial-groups 'joint', --initial-inquiry 'question'" in capsys.readouterr().out
    assert len(losses(out)) == STEPS


def test_vision_lr_scales_only_the_tower(world, tmp_path):
    """--vision-lr: the tower's groups get the schedule times vision_lr / lr. At 0 the tower ends
    exactly where it started while the LM moves (weight decay is 0)."""
    out = str(tmp_path / "vlr")
    run(world["args"] + ["--out-dir", out, "--no-activation-checkpointing", "--vision-lr", "0", "--stop-at-step", "1"],
        cwd=world["root"])
    base, after = load_file(os.path.join(world["base"], "model.safetensors")), final_weights(out, 1)
    vis = [k for k in after if k.startswith("visual.")]
    assert vis and all(torch.equal(after[k], base[k]) for k in vis)
    assert not torch.equal(after["lm_head.weight"], base["lm_head.weight"])


def test_a_bad_box_on_line_3_stops_sft_before_any_step(world, tmp_path, monkeypatch, capsys):
    """Issue 14, item 13: a gold box outside its image on line 3 once surfaced only when that
    sample was rendered, mid-run (after a checkpoint, on a real run). Now sft.py stops when its
    dataset is built, naming file:3 and the field, and renders nothing; --skip-bad counts it."""
    import data
    with open(world["train"]) as f:
        recs = [json.loads(line) for line in f if len(json.loads(line)["steps"]) > 1][:4]
    recs[2]["steps"][0]["tool"]["region"][0]["bbox_2d"] = [0, 0, 5000, 10]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["--model", world["base"], "--data", bad, "--image-root", os.path.dirname(world["train"]),
            "--global-batch", "2", "--max-steps", "1", "--num-workers", "0"]
    rendered = data.TrajectoryDataset.__getitem__
    monkeypatch.setattr(data.TrajectoryDataset, "__getitem__", lambda *a: pytest.fail("a sample was rendered"))
    with pytest.raises(data.RecordError, match=re.escape(f"{bad}:3: field 'steps[0].tool'")):
        run(args + ["--out-dir", tmp_path / "stop"], cwd=tmp_path)
    assert not os.path.exists(tmp_path / "stop" / "log.jsonl")
    monkeypatch.setattr(data.TrajectoryDataset, "__getitem__", rendered)
    run(args + ["--out-dir", tmp_path / "skip", "--skip-bad"], cwd=tmp_path)
    assert "3 samples (1 bad)" in capsys.readouterr().out and len(losses(str(tmp_path / "skip"))) == 1


def test_import_release_trains(world, tmp_path):
    # The authors' released records (a JSON list, pre-made crop files) train through --import-release;
    # a malformed one is skipped with --skip-bad.
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in (("orig.png", (112, 84)), ("crop.png", (140, 84))):
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(tmp_path / name)
    tool = '{"region": [{"index": 0, "bbox_2d": [0, 0, 56, 42]}], "query": "the sign"}'
    rec = {"images": ["orig.png", "crop.png"], "queries": ["", "read the number on the sign"],
           "image_to_query_mapping": [0, 1], "max_pixels": 200704,
           "conversations": [
               {"from": "system", "value": "You are a helpful assistant."},
               {"from": "human", "value": "<image>\nWhat number is on the sign?"},
               {"from": "gpt", "value": f"<think> The sign is small. </think>\n<tool> {tool} </tool>"},
               {"from": "human", "value": "<tool_response><image>The index of the zoom-in image is 1.</tool_response>"},
               {"from": "gpt", "value": "<think> It reads 7. </think>\n<answer> 7 </answer>"}]}
    with open(tmp_path / "release.json", "w") as f:
        json.dump([rec, dict(rec, image_to_query_mapping=[0]), rec], f)
    out = tmp_path / "out"
    run(["--model", world["base"], "--data", tmp_path / "release.json", "--import-release", "--skip-bad",
         "--global-batch", "2", "--max-steps", "1", "--out-dir", out], cwd=tmp_path)
    with open(out / "imported.jsonl") as f:
        assert len(f.readlines()) == 2
    assert losses(str(out))[0] > 0 and os.path.exists(out / "step_000001" / "model.safetensors")


def test_stock_plus_embedder_and_freeze_flags(world, stock_dir, embedder_dir, tmp_path):
    # --model stock Qwen2.5-VL + --embedder Qwen3-Embedding (the inquiry tokenizer comes from the
    # embedder folder); --freeze-vision keeps the ViT (fresh instruct projections included) as it
    # was, --train-text-proj trains text_proj; the text encoder never trains. The checkpoint is
    # a self-contained ViLaVT folder.
    out = tmp_path / "out"
    run(["--model", stock_dir, "--embedder", embedder_dir, "--data", world["train"], "--global-batch", "2",
         "--max-steps", "1", "--lr", "1e-2", "--freeze-vision", "--train-text-proj", "--out-dir", out], cwd=tmp_path)
    ckpt = out / "step_000001"
    assert os.path.exists(ckpt / "query_tokenizer" / "tokenizer.json")
    with open(ckpt / "config.json") as f:
        assert json.load(f)["model_type"] == "vilavt"
    after = ViLaVT.from_pretrained(str(ckpt)).state_dict()
    torch.manual_seed(0)  # sft.py seeds the new layers' init with --seed (0) before loading
    before = ViLaVT.from_pretrained(stock_dir, embedder_dir).state_dict()
    same = {k for k in before if torch.equal(before[k], after[k])}
    assert all(k in same for k in before if k.startswith(("visual.", "text_encoder.")))
    assert not any(k in same for k in before if k.startswith("text_proj."))
    assert "lm_head.weight" not in same and "model.layers.0.mlp.up_proj.weight" not in same
