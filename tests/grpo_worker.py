"""torchrun worker for tests/test_grpo.py: one GRPO update (steps 2-6 of grpo.py) on scripted
rollouts, the learner's micro-batches by argv[3] padded tokens (0: one trajectory per forward),
in argv[4] optimizer steps (mini-batches, default 2), the old log-probs in their own pass, or
with argv[5] == "fused" from the update's own forward (grpo.fused_old: one step only).
Writes the global loss and the parameter delta, so 1 and 2 processes, and any micro-batch size,
can be compared."""

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import rollout  # noqa: E402
from data import ChatTokenizer  # noqa: E402
from data import load_tokenizers  # noqa: E402
from scripted import Scripted  # noqa: E402
from training import build_model, dist_setup, dist_teardown, make_optimizer  # noqa: E402

P, G = 4, 2
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 1.5, 0.0]  # global row p*G + g


def turns(ct, p, g):
    call = {"region": [{"index": 0, "bbox_2d": [0, 0, 84, 84]}], "query": f"look at part {p}"}
    text = f"<think> answer {p} {g} </think>\n<answer> {p + g} </answer>"
    tool = ct.encode(f"<think> zoom </think>\n<tool> {json.dumps(call)} </tool>") if g == 0 else []
    return tool + ct.encode(text) + [ct.im_end]


def main():
    model_dir, out, micro_batch_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mini_batches, fused = (int(sys.argv[4]), sys.argv[5] == "fused") if len(sys.argv) > 4 else (2, False)
    rank, world, device = dist_setup()
    args = argparse.Namespace(seed=0, train_text_proj=True, freeze_vision=False, activation_checkpointing=False,
                              lr=1e-3, weight_decay=0.01, grad_clip=1.0, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
                              aggregation="token-mean", mini_batches=mini_batches, update_epochs=1,
                              micro_batch_tokens=micro_batch_tokens, temperature=1.0)
    model, cfg = build_model(model_dir, None, args, device, rank)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    before = {k: v.clone() for k, v in get_model_state_dict(model, options=full).items()}
    tok, qtok = load_tokenizers(model_dir, None, True)
    ct = ChatTokenizer(tok, qtok)
    mine = list(range(rank, P, world))
    prompts = [rollout.Prompt([Image.fromarray(np.random.default_rng(p).integers(0, 255, (168, 224, 3), np.uint8))],
                              f"Question {p}?") for p in mine]
    forced = [turns(ct, p, g) for p in mine for g in range(G)]
    model.eval()
    grpo.unsharded(model, True)
    with torch.no_grad():
        trajs = rollout.rollout(Scripted(model, forced), ct, prompts, G)
    grpo.unsharded(model, False)
    model.train()
    rewards = [REWARDS[p * G + g] for p in mine for g in range(G)]
    adv = grpo.gathered_advantages(rewards, mine, P, G, device)
    batch = grpo.learner_batch(ct, trajs, adv)
    if not fused:
        grpo.old_logprobs(model, batch, device, micro_batch_tokens)
    opt = make_optimizer(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    forwards, real = [], grpo.batch_logprobs  # count the update's forwards (micro-batches)
    grpo.batch_logprobs = lambda *a, **k: forwards.append(len(a[1])) or real(*a, **k)
    grads, step = {}, opt.step  # each optimizer step's full gradients (AdamW's first step is about
    # sign(g) * lr, so the weights alone would magnify float noise in near-zero gradients)

    def capture(*a, **k):
        for name, p in model.named_parameters():
            if p.grad is not None:
                grads[f"{len(grads) // len(params)}.{name}"] = getattr(p.grad, "full_tensor", lambda: p.grad)().clone()
        return step(*a, **k)

    opt.step = capture
    st = grpo.update(model, opt, params, batch, args, device)
    loss = torch.tensor([st["loss"]], dtype=torch.float64)
    torch.distributed.all_reduce(loss)
    after = get_model_state_dict(model, options=full)
    if rank == 0:
        save_file({k: (after[k] - before[k]).contiguous() for k in after}, out + ".safetensors")
        save_file({k: v.contiguous() for k, v in grads.items()}, out + ".grads.safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"loss": loss.item(), "adv": [float(a) for a in adv], "lengths": [len(t.ids) for t in trajs],
                       "n_tool_calls": [t.n_tool_calls for t in trajs], "rows": forwards}, f)
    dist_teardown()


if __name__ == "__main__":
    main()
