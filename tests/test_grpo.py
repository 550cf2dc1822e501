"""GRPO objective (paper Eq. 6) against hand-computed values, and group advantages."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from grpo import group_advantages, policy_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_advantages_hand_computed():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    # group [2, 2, 2, 2]: zero variance -> A = 0, no NaN
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]), 4)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4)) and not adv.isnan().any()
    with pytest.raises(AssertionError):
        group_advantages(torch.ones(6), 4)


def test_policy_loss_hand_computed():
    # Two trajectories x 4 tokens. Row 0 has A = +1, row 1 has A = -2.
    # ratios (exp of logp - old): row 0: 1.0, 1.2, 1.5, 0.5 ; row 1: 1.0, 0.7, 1.5, 5.0
    r = torch.tensor([[1.0, 1.2, 1.5, 0.5], [1.0, 0.7, 1.5, 5.0]])
    old = torch.zeros(2, 4)
    logp = r.log()
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # per token -min(r*A, clip(r, 0.8, 1.3)*A):
    # row 0 (A=1): r=1 -> -1; r=1.2 (inside) -> -1.2; r=1.5 -> clip 1.3 -> -min(1.5, 1.3) = -1.3;
    #              r=0.5 -> clip 0.8 -> -min(0.5, 0.8) = -0.5 (pessimistic: unclipped)
    # row 1 (A=-2): r=1 -> 2; r=0.7 -> -min(-1.4, -1.6) = 1.6 (clipped at 0.8);
    #              r=1.5 -> -min(-3.0, -2.6) = 3.0 (unclipped above: pessimistic); r=5 -> 10 (masked)
    per_token = torch.tensor([[-1.0, -1.2, -1.3, -0.5], [2.0, 1.6, 3.0, 10.0]])
    expected = (per_token * mask).sum() / 7
    assert torch.allclose(policy_loss(logp, old, adv, mask), expected, atol=1e-6)
    # seq-mean: mean of row means: (-4.0/4 + 6.6/3) / 2
    assert torch.allclose(policy_loss(logp, old, adv, mask, aggregation="seq-mean"),
                          torch.tensor((-1.0 + 2.2) / 2), atol=1e-6)
    # dual clip 3.0 caps negative-advantage tokens at -3.0 * A = 6: row 1's r=5 token (10 -> 6)
    mask_all = torch.ones(2, 4)
    dual = policy_loss(logp, old, adv, mask_all, dual_clip=3.0)
    assert torch.allclose(dual, (per_token.sum() - 10 + 6) / 8, atol=1e-6)
    # a global normalizer replaces the local token count
    assert torch.allclose(policy_loss(logp, old, adv, mask, normalizer=14), (per_token * mask).sum() / 14)


def test_masked_tokens_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g).requires_grad_()
    old = logp.detach() + 0.01 * torch.randn(3, 5, generator=g)  # ratios well inside [0.8, 1.3]: every token has a gradient
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    loss = policy_loss(logp, old, torch.tensor([1.0, -1.0, 2.0]), mask)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all() and (logp.grad[mask == 1] != 0).all()
    # changing masked-out values changes nothing
    logp2 = logp.detach().clone()
    logp2[mask == 0] += 5
    assert torch.equal(policy_loss(logp2, old, torch.tensor([1.0, -1.0, 2.0]), mask), loss.detach())


def test_gradient_is_zero_outside_the_trust_region():
    # A > 0 and r above 1 + 0.3: clipped, no gradient; A < 0 and r below 1 - 0.2: no gradient
    logp = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_()
    policy_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1)).backward()
    assert torch.equal(logp.grad, torch.zeros(2, 1))


# -----------------------------------------------------------------------------
# distributed: 1 and 2 processes give the same update on the same (scripted) rollouts


def tiny_folder(path, tokenizer):
    from model import ViLaVT, tiny_config
    torch.manual_seed(0)
    m = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    m.init_weights()
    m.save_pretrained(path)
    tokenizer.save_pretrained(path)
    tokenizer.save_pretrained(os.path.join(path, "query_tokenizer"))
    return path


def torchrun(n, *argv):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_one_and_two_processes_and_any_micro_batch_give_the_same_update(tmp_path, tokenizer):
    """One trajectory per forward on 1 process is the reference; 2 processes with 2-row
    micro-batches (rows of 930 and 700 tokens: padded) and 1 process with each mini-batch's 4
    trajectories in one forward give the same update."""
    from safetensors.torch import load_file
    model_dir = tiny_folder(str(tmp_path / "model"), tokenizer)
    worker = os.path.join(os.path.dirname(__file__), "grpo_worker.py")
    runs = {"one": (1, 0), "two": (2, 1860), "one_batched": (1, 100000)}
    for name, (nproc, tokens) in runs.items():
        torchrun(nproc, worker, model_dir, str(tmp_path / name), str(tokens))
    res = {n: json.load(open(tmp_path / f"{n}.json")) for n in runs}
    deltas = {n: load_file(str(tmp_path / f"{n}.safetensors")) for n in runs}
    d1 = deltas["one"]
    moved = [k for k in d1 if d1[k].abs().max() > 0]
    assert any(k.startswith("model.layers") for k in moved) and any(".instruct_" in k for k in moved)
    assert not any(k.startswith("text_encoder.") for k in moved)  # always frozen
    assert res["one"]["lengths"] == [930, 700] * 4  # (row g = 0 makes a tool call)
    # rows per forward on rank 0 (2 mini-batches): 1 each; 2 each (2 x 930 <= 1860); 4 each
    assert res["one"]["rows"] == [1] * 8 and res["two"]["rows"] == [2, 2] and res["one_batched"]["rows"] == [4, 4]
    grads = {n: load_file(str(tmp_path / f"{n}.grads.safetensors")) for n in runs}
    assert {k.split(".")[0] for k in grads["one"]} == {"0", "1"}  # 2 optimizer steps (mini-batches)
    scale = max(g.abs().max() for g in grads["one"].values())
    for n in ("two", "one_batched"):
        assert abs(res[n]["loss"] - res["one"]["loss"]) <= 1e-5 * max(1.0, abs(res["one"]["loss"])), n
        assert grads[n].keys() == grads["one"].keys()
        for k, g in grads["one"].items():  # the same gradients, up to float summation order
            assert (grads[n][k] - g).abs().max() <= 1e-5 * scale, (n, k)
        for k in d1:  # and so the same weights (AdamW's first step is about sign(g) * lr: looser)
            assert (deltas[n][k] - d1[k]).abs().max() <= 1e-4, (n, k)


def test_old_logprobs_from_the_update_forward_give_the_same_update(tmp_path, tokenizer):
    """One optimizer step per rollout batch (grpo.fused_old): the old log-probs taken from the
    update's own forward, detached, on 2 processes in 2-row micro-batches, give the update of the
    separate no-grad pass on 1 process, one trajectory per forward: the same loss and gradients."""
    from safetensors.torch import load_file
    model_dir = tiny_folder(str(tmp_path / "model"), tokenizer)
    worker = os.path.join(os.path.dirname(__file__), "grpo_worker.py")
    runs = {"pass": (1, 0, "pass"), "fused": (2, 1860, "fused")}
    for name, (nproc, tokens, old) in runs.items():
        torchrun(nproc, worker, model_dir, str(tmp_path / name), str(tokens), "1", old)
    res = {n: json.load(open(tmp_path / f"{n}.json")) for n in runs}
    grads = {n: load_file(str(tmp_path / f"{n}.grads.safetensors")) for n in runs}
    assert res["pass"]["rows"] == [1] * 8 and res["fused"]["rows"] == [2, 2]  # rank 0's forwards (1 step)
    assert {k.split(".")[0] for k in grads["pass"]} == {"0"} and grads["pass"].keys() == grads["fused"].keys()
    assert abs(res["fused"]["loss"] - res["pass"]["loss"]) <= 1e-5 * max(1.0, abs(res["pass"]["loss"]))
    scale = max(g.abs().max() for g in grads["pass"].values())
    assert scale > 0
    for k, g in grads["pass"].items():
        assert (grads["fused"][k] - g).abs().max() <= 1e-5 * scale, k


def test_fused_old_logprobs_only_for_one_optimizer_step():
    import argparse

    import grpo
    one = argparse.Namespace(mini_batches=1, update_epochs=1)
    assert grpo.fused_old(one)
    assert not grpo.fused_old(argparse.Namespace(mini_batches=2, update_epochs=1))
    assert not grpo.fused_old(argparse.Namespace(mini_batches=1, update_epochs=2))
    with pytest.raises(AssertionError, match="old log-probs are needed"):  # a batch without them, 2 steps
        grpo.update(None, None, [], [dict(ids=[1, 2], mask=torch.ones(1))], argparse.Namespace(
            mini_batches=2, update_epochs=1), torch.device("cpu"))


def test_shared_originals_are_encoded_once_with_the_same_logprobs_and_gradients(tokenizer):
    """The learner encodes a group that repeats in a micro-batch once (data.unique_groups: a
    prompt's G rollouts share its originals): the log-probs and every gradient equal those of
    encoding each trajectory's images itself."""
    import numpy as np
    from PIL import Image

    import data
    import grpo
    import rollout
    from grpo_worker import turns
    from model import ViLaVT, tiny_config
    from scripted import Scripted

    torch.manual_seed(0)
    model = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    model.init_weights()
    ct = data.ChatTokenizer(tokenizer, tokenizer)
    P, G = 3, 2
    image = lambda seed: Image.fromarray(np.random.default_rng(seed).integers(0, 255, (168, 224, 3), np.uint8))  # noqa: E731
    prompts = [rollout.Prompt([image(p), image(p + 10)][:1 + p % 2], f"Question {p}?") for p in range(P)]
    with torch.no_grad():
        trajs = rollout.rollout(Scripted(model, [turns(ct, p, g) for p in range(P) for g in range(G)]), ct, prompts, G)
    items = grpo.learner_batch(ct, trajs, [torch.tensor(1.0)] * len(trajs))
    merged = data.Context.merge_encoder_inputs([t["enc"] for t in items])
    once = data.unique_groups(merged)
    # 8 originals (G x 1, 2, 1) and 3 crops (row g = 0 zooms), in rollout order: each prompt's
    # originals are encoded once for its 2 rollouts, every crop for its own
    assert merged["grid_thw"].shape[0] == 11 and once["grid_thw"].shape[0] == 7
    assert once["image_index"].tolist() == [0, 1, 0, 2, 3, 4, 2, 3, 5, 6, 5]
    res = {}
    for name, dedupe in (("each", lambda enc: enc), ("once", data.unique_groups)):
        model.zero_grad()
        real, data.unique_groups = data.unique_groups, dedupe
        try:
            logp = grpo.batch_logprobs(model, items, torch.device("cpu"))
        finally:
            data.unique_groups = real
        (logp * torch.linspace(-1, 1, logp.numel()).view(logp.shape)).sum().backward()
        res[name] = logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert (res["once"][0] - res["each"][0]).abs().max() <= 1e-6
    assert any(n.startswith("visual.") for n in res["each"][1]) and res["each"][1].keys() == res["once"][1].keys()
    for n, g in res["each"][1].items():
        assert (res["once"][1][n] - g).abs().max() <= 1e-5 * max(1e-3, g.abs().max()), n


def test_micro_batches_by_padded_tokens():
    from training import micro_batches  # (sft.py's micro-batches too)
    lengths = [300, 500, 400, 1200, 100, 100, 100]
    shortest_first = [4, 5, 6, 0, 2, 1, 3]  # so that little is padded
    assert micro_batches(lengths, 0) == [[i] for i in shortest_first]
    # padded size = rows x longest <= 1000: 3 x 100 (+300 would pad to 4 x 300), 2 x 400, 500, 1200
    assert micro_batches(lengths, 1000) == [[4, 5, 6], [0, 2], [1], [3]]
    assert micro_batches(lengths, 1000, n_groups=6) == [[4], [5], [6], [0, 2], [1], [3]]  # the largest halved
    # fewest padded tokens plus FORWARD_COST (512) per forward, not the fullest groups: filling
    # greedily would pad all 7 to 1200 (8,400 + 512); this split pads 300 + 1,500 + 1,200 + 3 x 512
    assert micro_batches(lengths, 10**6) == [[4, 5, 6], [0, 2, 1], [3]]
    assert micro_batches(lengths, 10**6, forward_cost=10**4) == [shortest_first]  # forwards dear: one
    assert micro_batches(lengths, 10**6, forward_cost=0) == [[i] for i in shortest_first]  # free: no padding
    # many short rows and a few long ones (a GRPO batch): apart, not 6 rows padded to 500 (3,000)
    assert micro_batches([100] * 4 + [500] * 2, 3000) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(AssertionError, match="do not make 8 micro-batches"):
        micro_batches(lengths, 0, n_groups=8)


# -----------------------------------------------------------------------------
# learning: a toy reward that is known, through the same functions as grpo.train


def test_mean_reward_rises_on_a_toy_reward(tmp_path, tokenizer):
    """One-token answers, reward 1 when the token's id is even: the batch machinery (rollout
    on unsharded FSDP weights, gathered advantages, old log-probs, Eq. 6 updates) must move
    the policy towards even tokens within a few dozen steps."""
    import argparse

    import numpy as np
    from PIL import Image

    import grpo
    import rollout
    from data import ChatTokenizer, load_tokenizers
    from training import build_model, dist_setup, dist_teardown, make_optimizer

    model_dir = tiny_folder(str(tmp_path / "model"), tokenizer)
    threads = torch.get_num_threads()
    rank, world, device = dist_setup()
    try:
        args = argparse.Namespace(seed=0, train_text_proj=False, freeze_vision=True, activation_checkpointing=False,
                                  lr=1e-2, weight_decay=0.0, grad_clip=1.0, clip_low=0.2, clip_high=0.3,
                                  dual_clip=None, aggregation="token-mean", mini_batches=2, update_epochs=1,
                                  micro_batch_tokens=4096, temperature=1.0)
        model, _ = build_model(model_dir, None, args, device, rank)
        ct = ChatTokenizer(*load_tokenizers(model_dir))
        opt = make_optimizer(model, args)
        params = [p for p in model.parameters() if p.requires_grad]
        P, G = 2, 8
        prompts = [rollout.Prompt([Image.fromarray(np.random.default_rng(i).integers(0, 255, (56, 56, 3), np.uint8))],
                                  f"Say a token {i}.", system="Answer.", instructions="") for i in range(P)]
        # (short prompts keep the test fast: the machinery is the same as with Figures 15/16)
        limits = rollout.Limits(max_turn_tokens=1, max_new_tokens=1, max_context=256)
        curve = []
        for step in range(20):
            model.eval()
            grpo.unsharded(model, True)
            with torch.no_grad():
                trajs = rollout.rollout(model, ct, prompts, G, rollout.Sampling(seed=step), limits)
            grpo.unsharded(model, False)
            model.train()
            rewards = [float(t.ids[-1] % 2 == 0) for t in trajs]
            adv = grpo.gathered_advantages(rewards, list(range(P)), P, G, device)
            batch = grpo.learner_batch(ct, trajs, adv)
            grpo.old_logprobs(model, batch, device, args.micro_batch_tokens)  # (2 mini-batches: needed)
            grpo.update(model, opt, params, batch, args, device)
            curve.append(sum(rewards) / len(rewards))
    finally:
        dist_teardown()
        torch.set_num_threads(threads)
    print("mean reward per step:", " ".join(f"{r:.2f}" for r in curve))
    assert sum(curve[-5:]) / 5 >= sum(curve[:5]) / 5 + 0.3, curve


# -----------------------------------------------------------------------------
# resume: a run stopped after step 2 and resumed continues the same curve


TIMING = ("rollout_tok_s", "update_tok_s", "rollout_s", "old_logp_s", "update_s")


def grpo_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f if ln.strip()]


def test_distributed_tears_down_after_the_body_and_after_an_error():
    """training.distributed: a world of one (no torchrun) set up, torn down after the body, and after
    an error torn down too with the error passed on, so a failed run leaves no process group behind."""
    import torch.distributed as dist

    from training import distributed
    threads = torch.get_num_threads()
    with distributed() as (rank, world, device):
        assert dist.is_initialized() and (rank, world, device.type) == (0, 1, "cpu")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="boom"):
        with distributed():
            raise ValueError("boom")
    assert not dist.is_initialized()
    torch.set_num_threads(threads)


def test_resume_continues_the_same_curve(tmp_path, tokenizer, capsys):
    from safetensors.torch import load_file

    import grpo
    import zoom_world
    model_dir = tiny_folder(str(tmp_path / "model"), tokenizer)
    zoom = zoom_world.make_world(str(tmp_path / "zoom"), n_train=8, n_eval=1, seed=1)
    common = ["--model", model_dir, "--data", zoom["train"], "--steps", "4", "--save-every", "2",
              "--prompts-per-step", "2", "--group-size", "2", "--max-turn-tokens", "6", "--max-new-tokens", "12",
              "--max-context", "2048", "--lr", "1e-3", "--no-freeze-vision", "--temperature", "1.0", "--dump-every", "2"]
    threads = torch.get_num_threads()
    try:
        grpo.main(common + ["--out-dir", str(tmp_path / "full")])
        grpo.main(common + ["--out-dir", str(tmp_path / "cut"), "--stop-at-step", "2"])
        assert len(grpo_log(tmp_path / "cut")) == 2
        grpo.main(common + ["--out-dir", str(tmp_path / "cut"), "--resume"])
        capsys.readouterr()
        grpo.main(common + ["--out-dir", str(tmp_path / "bench"), "--bench"])
    finally:
        torch.set_num_threads(threads)
    full, cut = grpo_log(tmp_path / "full"), grpo_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4] and cut == full
    # a resume past the end (the run is at step 4, --stop-at-step 2) stops at once (it once looped forever)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *common, "--out-dir", str(tmp_path / "cut"),
                        "--resume", "--stop-at-step", "2"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0 and grpo_log(tmp_path / "cut") == full, p.stderr[-2000:]
    a = load_file(str(tmp_path / "full" / "latest" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "latest" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "full" / "trajectories.jsonl") as f:
        dumped = [json.loads(ln) for ln in f]
    assert [d["step"] for d in dumped] == [2] * 4 + [4] * 4  # prompts x G at steps 2 and 4
    assert {"turns", "reward", "advantage", "crops", "queries", "finish"} <= set(dumped[0])
    # killed after step 3 wrote its trajectories but before its checkpoint: the resumed run redoes
    # step 3 and trajectories.jsonl keeps it once, as log.jsonl does
    killed = tmp_path / "killed"
    try:
        grpo.main(common + ["--out-dir", str(killed), "--stop-at-step", "3", "--dump-every", "1"])
        shutil.rmtree(killed / "step_000003")
        os.remove(killed / "latest")
        os.symlink("step_000002", killed / "latest")
        grpo.main(common + ["--out-dir", str(killed), "--resume", "--dump-every", "1"])
    finally:
        torch.set_num_threads(threads)
    with open(killed / "trajectories.jsonl") as f:
        assert [json.loads(ln)["step"] for ln in f] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert grpo_log(killed) == full
    # --bench: the step split, and the learner against one trajectory per forward; writes nothing
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bench: ")]
    assert len(line) == 1 and "over 3 steps" in line[0] and "x faster" in line[0], line
    assert not os.path.exists(tmp_path / "bench")
    # the training-dynamics figure (paper Figure 9): one PNG per curve
    from PIL import Image
    grpo.main(["--plot", str(tmp_path / "full" / "log.jsonl")])
    assert Image.open(tmp_path / "full" / "log.png").size == (4 * 360, 3 * 240)


def test_batch_logprobs_equal_each_trajectory_alone(tokenizer):
    """A right-padded micro-batch (one vision call, one LM forward, the lm_head at policy tokens
    only) gives each trajectory's log-probs and entropies of a forward of it alone, at its policy
    tokens, and 0 elsewhere."""
    import numpy as np
    from PIL import Image

    import grpo
    import rollout
    from data import Budget, ChatTokenizer
    from model import ViLaVT, tiny_config
    torch.manual_seed(0)
    model = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>"))).eval()
    model.init_weights()
    ct = ChatTokenizer(tokenizer)
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8))
            for i, (w, h) in enumerate([(448, 336), (200, 300), (300, 300)])]
    prompts = [rollout.Prompt([im], f"Question {i}?") for i, im in enumerate(imgs)]
    with torch.no_grad():
        trajs = rollout.rollout(model, ct, prompts, 2, rollout.Sampling(seed=0),
                                rollout.Limits(max_turn_tokens=20, max_new_tokens=20), Budget(max_pixels=224 * 224))
        items = [dict(ids=t.ids, enc=t.encoder_inputs(ct), mask=torch.tensor(t.policy_mask[1:], dtype=torch.float32))
                 for t in trajs]
        assert len({len(t["ids"]) for t in items}) > 1  # rows of different lengths: padded
        lp, ent = grpo.batch_logprobs(model, items, "cpu", entropy=True)
        for k, t in enumerate(items):
            ids = torch.tensor([t["ids"]])
            h = model.hidden_states(ids, **t["enc"])
            want, want_ent = model.token_logprobs(h[:, :-1], ids[:, 1:], entropy=True)
            m, n = t["mask"].bool(), len(t["ids"]) - 1
            assert torch.allclose(lp[k, :n][m], want[0][m], atol=1e-5) and torch.allclose(ent[k, :n][m], want_ent[0][m],
                                                                                           atol=1e-5)
            assert not lp[k, :n][~m].any() and not lp[k, n:].any()
        # at the sampler's temperature: log softmax(logits / T), the policy that sampled (verl's rule)
        hot = grpo.batch_logprobs(model, items[:1], "cpu", temperature=0.5)
        ids = torch.tensor([items[0]["ids"]])
        logits = model(ids, **items[0]["enc"])[0, :-1] / 0.5
        want = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        m = items[0]["mask"].bool()
        assert torch.allclose(hot[0][m], want[m], atol=1e-5) and not torch.allclose(hot[0][m], lp[0, :len(m)][m])


def test_prompt_order_is_one_permutation_per_epoch():
    """Every record once per epoch, also when a step straddles an epoch boundary (5 records, 2
    per step: step 2 takes the last record of epoch 0 and the first of epoch 1)."""
    from grpo import prompt_order
    seq = [i for step in range(5) for i in prompt_order(step, 2, 5, seed=0)]
    assert sorted(seq[:5]) == sorted(seq[5:]) == list(range(5)), seq
    assert prompt_order(3, 2, 5, seed=0) == seq[6:8] and prompt_order(3, 2, 5, seed=1) != seq[6:8]


def test_a_record_whose_pixels_fail_mid_run_is_skipped_or_stops(tmp_path, tokenizer):
    """An image whose header reads (so the load passes) but whose pixels are cut off: GRPO stops
    naming file:line and the field, or with --skip-bad gives its place to the next record and
    counts it (it once ignored --skip-bad and crashed mid-run)."""
    import grpo
    import zoom_world
    from data import RecordError
    model_dir = tiny_folder(str(tmp_path / "model"), tokenizer)
    zoom = zoom_world.make_world(str(tmp_path / "zoom"), n_train=4, n_eval=1, seed=1)
    first = json.loads(open(zoom["train"]).readline())
    img = tmp_path / "zoom" / first["images"][0]
    blob = img.read_bytes()
    img.write_bytes(blob[:len(blob) // 2])  # the PNG header survives, the pixel data does not
    common = ["--model", model_dir, "--data", zoom["train"], "--steps", "1", "--prompts-per-step", "4",
              "--group-size", "2", "--max-turn-tokens", "4", "--max-new-tokens", "8", "--max-context", "2048",
              "--lr", "1e-3", "--dump-every", "0"]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RecordError, match=f"{zoom['train']}:1: field 'images'"):
            grpo.main(common + ["--out-dir", str(tmp_path / "stop")])
        grpo.main(common + ["--out-dir", str(tmp_path / "skip"), "--skip-bad"])
    finally:
        torch.set_num_threads(threads)
    (row,) = grpo_log(tmp_path / "skip")
    assert row["skipped"] == 1


def test_a_prompt_that_cannot_render_is_refused_at_load(tmp_path, tokenizer):
    """A record whose own user turn places more '<image>'s than it has images loaded fine and
    stopped GRPO in its rollout, mid-run, with a bare ValueError (issue 14, item 13): it is
    refused at load naming file:line and the field, or with --skip-bad skipped and counted."""
    import grpo
    from PIL import Image
    from data import RecordError
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    good = dict(images=["a.png"], question="How many?", problem_type="numerical", answer="3")
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, dict(good, prompt="<image><image> How many?"))))
    from data import Budget, ChatTokenizer
    ct = ChatTokenizer(tokenizer)
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: field 'prompt'")):
        grpo.load_prompts(str(path), str(tmp_path), False, ct, Budget(), 4096)
    recs, n_bad = grpo.load_prompts(str(path), str(tmp_path), True, ct, Budget(), 4096)
    assert [w for w, _ in recs] == [f"{path}:1"] and n_bad == 1


def test_a_prompt_longer_than_max_context_is_refused_at_load(tmp_path, tokenizer):
    """A prompt that cannot fit --max-context stopped GRPO mid-run at the rollout's assert. Its
    length is measured at load, its images sized from their headers as the rollout sizes them
    (prompt_tokens = the rollout's own prompt ids), and it is refused naming file:line and the
    field, or with --skip-bad skipped and counted."""
    import data
    import grpo
    from PIL import Image
    from data import Budget, ChatTokenizer, read_jsonl
    Image.new("RGB", (56, 56)).save(tmp_path / "small.png")
    Image.new("RGB", (560, 560)).save(tmp_path / "big.png")  # 400 visual tokens
    rec = dict(question="How many?", problem_type="numerical", answer="3")
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(dict(rec, images=[p])) + "\n" for p in ("small.png", "big.png")))
    ct, budget = ChatTokenizer(tokenizer), Budget()
    recs = read_jsonl(str(path))[0]
    lengths = [grpo.prompt_tokens(r, w, str(tmp_path), ct, budget) for w, r in recs]
    for (w, r), n in zip(recs, lengths):  # the rollout writes exactly this many prompt tokens
        p = grpo.make_prompt(w, r, str(tmp_path), budget)
        ctx = data.Context.of(p.images, budget, p.max_pixels)
        parts = data.prompt_parts([v.display for v in ctx.views], p.question, p.system, p.user, p.instructions)
        assert n == len(ct.encode_parts(parts, [v.n_tokens for v in ctx.views]))
    assert lengths[1] > lengths[0] + 390
    limit = lengths[1]  # the big one needs lengths[1] + 2 slots
    with pytest.raises(data.RecordError, match=re.escape(f"{path}:2: field 'prompt': {lengths[1]} tokens")):
        grpo.load_prompts(str(path), str(tmp_path), False, ct, budget, limit)
    kept, n_bad = grpo.load_prompts(str(path), str(tmp_path), True, ct, budget, limit)
    assert [w for w, _ in kept] == [f"{path}:1"] and n_bad == 1
    assert len(grpo.load_prompts(str(path), str(tmp_path), False, ct, budget, lengths[1] + 2)[0]) == 2


def test_the_initial_encoding_reaches_the_rollouts(tmp_path, tokenizer, monkeypatch):
    """--initial-groups/--initial-inquiry (data.Initial): every prompt GRPO rolls out carries them,
    with the record's bare question as the originals' inquiry."""
    import data
    import grpo
    import rollout
    import zoom_world
    model_dir = tiny_folder(str(tmp_path / "model"), tokenizer)
    zoom = zoom_world.make_world(str(tmp_path / "zoom"), n_train=4, n_eval=1, seed=1)
    questions = {json.loads(line)["question"] for line in open(zoom["train"])}
    seen, real = [], rollout.rollout
    monkeypatch.setattr(rollout, "rollout", lambda model, ct, prompts, *a, **k: seen.extend(prompts) or
                        real(model, ct, prompts, *a, **k))
    threads = torch.get_num_threads()
    try:
        grpo.main(["--model", model_dir, "--data", zoom["train"], "--steps", "1", "--prompts-per-step", "2",
                   "--group-size", "2", "--max-turn-tokens", "4", "--max-new-tokens", "8", "--max-context", "2048",
                   "--dump-every", "0", "--out-dir", str(tmp_path / "out"), "--initial-groups", "joint",
                   "--initial-inquiry", "question"])
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 2 and all(p.initial == data.Initial(joint=True, inquiry=True) for p in seen)
    assert all(p.inquiry in questions for p in seen)
