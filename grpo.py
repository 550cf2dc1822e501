"""
GRPO for ViLaVT (paper section 3.4, Eq. 5-6): clip 0.2/0.3, no KL term, no reference model.

    torchrun --nproc_per_node 8 grpo.py --model out/sft/latest --data rl.jsonl --image-root DIR
    ... same command + --resume                  # continue out_dir/latest exactly
    python grpo.py --plot out/grpo/log.jsonl     # training-dynamics curves (paper Figure 9)

One step (paper defaults 96 prompts x G=4):
  1. each rank rolls out its share of the prompts on full weights (FSDP2 units are all-gathered
     once for the whole rollout phase, not per decoded token), then reshards;
  2. scores with reward.py (Eq. 5);
  3. gathers every group's rewards over ranks (placement of a group's rollouts does not matter);
  4. A = (R - mean_group) / (std_group + delta), delta = 1e-6 (Eq. 6, App. C);
  5. recomputes old log-probs with the training model on exactly the rollout tokens (not the
     sampler's numbers): in a pass of their own where the update takes several optimizer steps,
     else in the update's own forward (fused_old: the same numbers, one forward fewer);
  6. runs the Eq. 6 updates: ratio clipped to [1-0.2, 1+0.3], no KL, no reference model; the
     loss mask is the policy-token mask (observations, image pads, role headers get no loss).
Checkpoints, resume and the distributed setup are training.py's, as for sft.py.
"""

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import data
import plots
import reward
import rollout
from data import RecordError
from pixels import FACTOR
from model import config_to_hf
from training import (build_model, distributed, make_optimizer, open_log, padded, padded_forward, print0,
                      rank_micro_batches, resolve_checkpoint, restore, save, start_point, warn)


# -----------------------------------------------------------------------------
# the objective (paper Eq. 6)


def group_advantages(rewards, group_size, eps=1e-6):
    """Eq. 6's A(tau) = (R - b) / (sigma + delta): b and sigma the mean and std of the rewards of
    one prompt's G rollouts (consecutive groups), delta = eps (paper: 1e-6). std is unbiased
    (N-1), as in the release. A group whose rewards are all equal gets A = 0 (0 / eps), never
    NaN. rewards: (N,) -> (N,)."""
    assert group_size >= 2, "GRPO needs at least 2 rollouts per prompt (the unbiased std of 1 is undefined)"
    assert rewards.numel() % group_size == 0, f"{rewards.numel()} rewards are not groups of {group_size}"
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=None,
                aggregation="token-mean", normalizer=None):
    """Eq. 6 per token: -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A), rho = exp(logp - logp_old).

    logp, old_logp, mask: (B, T); adv: (B,), broadcast to every token of its trajectory.
    dual_clip (release: 3.0): for A < 0 the loss is also capped at -dual_clip*A, so a huge
    ratio on a bad trajectory cannot blow up the update.
    aggregation: "token-mean" (default: mean over all masked tokens) or "seq-mean" (mean over
    trajectories of each one's token mean, the release's option). normalizer: divide by this
    instead of the local count (the global token or trajectory count when the batch is split
    over ranks and micro-batches, so every split gives the same gradient)."""
    mask = mask.to(logp.dtype)
    a = adv[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -a * dual_clip), loss)
    if aggregation == "token-mean":
        total = (loss * mask).sum()
        return total / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    if aggregation == "seq-mean":
        per_seq = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / (normalizer if normalizer is not None else logp.shape[0])
    raise ValueError(f"unknown aggregation {aggregation!r} (token-mean or seq-mean)")


# -----------------------------------------------------------------------------
# rollouts on full weights


def unsharded(model, on):
    """FSDP2: all-gather every unit's weights once for the rollout phase (and keep them
    gathered across forwards), so decoding does no all-gather per token; then reshard."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            if m is not model:  # the root keeps its weights gathered after forward anyway (FSDP2's default)
                m.set_reshard_after_forward(not on, recurse=False)
            m.unshard() if on else m.reshard()


def prompt_order(step, P, n, seed):
    """The records of step `step`: global prompt position p = step * P + j is record
    perm_e[p % n] of epoch e = p // n, a seeded permutation per epoch (as sft.py's data order),
    so a step that straddles an epoch boundary takes the next epoch's first records."""
    positions = range(step * P, step * P + P)
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
             for e in {p // n for p in positions}}  # one permutation per epoch the step touches, not per prompt
    return [int(perms[p // n][p % n]) for p in positions]


def load_prompts(path, image_root, skip_bad, ct, budget, max_context):
    """The records, each checked at load (data.check_record: fields, image headers) and its prompt
    measured against max_context, so that no step of the run stops on a prompt that cannot fit:
    a bad one stops the run now, naming file:line, or with skip_bad is skipped and counted."""
    recs, n_bad = data.read_jsonl(path, skip_bad, warn, image_root=image_root, need_answer=True)
    fits = []
    for where, rec in recs:
        n = prompt_tokens(rec, where, image_root, ct, budget)
        if n + 1 < max_context:  # the rollout's own bound (rollout.rollout)
            fits.append((where, rec))
            continue
        msg = f"{where}: field 'prompt': {n} tokens with its images, no room under --max-context {max_context}"
        if not skip_bad:
            raise RecordError(msg)
        n_bad += 1
        warn(f"skipping bad record: {msg}")
    if not fits:
        raise SystemExit(f"{path}: no usable records")
    return fits, n_bad


def prompt_tokens(rec, where, image_root, ct, budget):
    """Tokens of a record's prompt as the rollout will write it, its images' sizes from the files'
    headers (no pixel decoded), sized by the rule Context.of applies."""
    _, displays = data.original_displays(rec, image_root, budget)
    parts = data.prompt_parts(displays, **data.record_prompt(rec))
    return len(ct.encode_parts(parts, [(w // FACTOR) * (h // FACTOR) for w, h in displays]))


def make_prompt(where, rec, image_root, budget, initial=data.Initial()):
    """A record's prompt, read as SFT reads it (data.record_prompt, data.Initial); a "direct" record makes no
    tool calls."""
    imgs = data.load_originals(rec, where, image_root, budget.max_frames)
    t_max = 0 if rec.get("mode") == "direct" else rec.get("max_tool_calls")
    return rollout.Prompt(imgs, max_tool_calls=t_max, max_pixels=rec.get("max_pixels"), initial=initial,
                          inquiry=rec["question"], **data.record_prompt(rec))


def make_prompts(records, picks, image_root, budget, skip_bad, initial=data.Initial()):
    """The prompts of records[picks]. A record whose images fail to decode here (its fields and
    image headers were checked at load) stops the run, or with skip_bad gives its place to the
    next record and is counted, so every rank keeps its share. Returns (record indices used,
    prompts, number skipped)."""
    used, prompts, skipped = [], [], 0
    for r in picks:
        for _ in range(len(records)):
            try:
                prompts.append(make_prompt(*records[r], image_root, budget, initial))
                break
            except RecordError as e:
                if not skip_bad:
                    raise
                skipped += 1
                warn(f"skipping bad record: {e}")
                r = (r + 1) % len(records)
        else:
            raise SystemExit("--skip-bad: no record of the data loads")
        used.append(r)
    return used, prompts, skipped


def score(traj, rec):
    """reward.score on a trajectory; R_correct, R_format, R (Eq. 5)."""
    return reward.score(traj.turns, rec["answer"], rec["problem_type"], traj.image_sizes(), traj.n_images_at_turn)


# -----------------------------------------------------------------------------
# log-probs on exactly the rollout tokens


def batch_logprobs(model, items, device, entropy=False, temperature=1.0):
    """log pi(token_t | <t) at the policy tokens of a micro-batch of trajectories, as (rows, T-1)
    right padded, 0 wherever the policy mask is 0: the same ids the sampler produced, every image
    re-encoded in its own group with its own inquiry, in one padded forward (training.padded_forward,
    the shared originals encoded once). The lm_head and its log-softmax run at the policy tokens
    only (the prompt, images and observations need no log-probs). temperature: the sampler's, so
    that the ratio of Eq. 6 is between the policies that sampled (as verl; top-p is not applied).
    entropy=True: also the entropy there, (rows, T-1)."""
    ids, h = padded_forward(model, [t["ids"] for t in items], [t["enc"] for t in items], device, share=True)
    pick = padded(items, "mask", ids.shape[1] - 1, device).bool()  # predicts the policy token at t+1
    out = model.token_logprobs(h[:, :-1][pick][None], ids[:, 1:][pick][None], entropy=entropy,
                               temperature=temperature)
    scatter = lambda v: torch.zeros(pick.shape, dtype=v.dtype, device=device).masked_scatter(pick, v[0])  # noqa: E731
    return tuple(map(scatter, out)) if entropy else scatter(out)


def gathered_advantages(rewards, mine, P, G, device):
    """rewards: this rank's, G per prompt, for global prompt numbers `mine`. Every rank fills its
    rows of the global (P*G,) reward vector, one all-reduce completes it, and each rank reads its
    own rows' advantages back, so the result does not depend on where a group's rollouts ran."""
    glob = torch.zeros(P * G, dtype=torch.float64, device=device)
    rows = [mine[i // G] * G + i % G for i in range(len(rewards))]
    glob[rows] = torch.tensor(rewards, dtype=torch.float64, device=device)
    dist.all_reduce(glob)  # each global row is filled by exactly one rank
    adv = group_advantages(glob, G)
    return [adv[r].float().cpu() for r in rows]


def learner_batch(ct, trajs, adv):
    """The update batch: every trajectory's tokens, encoder inputs, policy mask (T-1,) and advantage."""
    return [dict(ids=t.ids, enc=t.encoder_inputs(ct), mask=torch.tensor(t.policy_mask[1:], dtype=torch.float32),
                 adv=a) for t, a in zip(trajs, adv)]


def fused_old(args):
    """One optimizer step per rollout batch (the paper's setting): the policy that the update
    starts from is the one that sampled, so the old log-probs are the update forward's own,
    detached (ratio 1, Eq. 6's gradient unchanged), and their separate pass would be a wasted
    forward (TRL does the same with num_iterations 1). More steps need them fixed beforehand.
    SPEC 6 has them recomputed before the updates: the same numbers by the same model (tested
    within 1e-5), taken one forward later; README, "Where we differ"."""
    return args.mini_batches == 1 and args.update_epochs == 1


def old_logprobs(model, batch, device, micro_batch_tokens=0, temperature=1.0):
    """Each item's "old" (T-1,): log-probs under the current (= old) policy, in a no-grad pass;
    returns the summed entropy at the policy tokens."""
    ent = 0.0
    with torch.no_grad():
        for items in rank_micro_batches(batch, micro_batch_tokens, device):
            old, e = batch_logprobs(model, items, device, entropy=True, temperature=temperature)
            for k, t in enumerate(items):
                n = len(t["ids"]) - 1
                t["old"] = old[k, :n].cpu()
                ent += float((e[k, :n].cpu() * t["mask"]).sum())
    return ent


# -----------------------------------------------------------------------------
# one policy update on a batch of scored trajectories


def update(model, opt, params, batch, args, device):
    """Eq. 6 over `batch` (this rank's trajectories: dicts with ids, enc, mask (T-1,), adv (), and
    old (T-1,) unless fused_old(args)), in args.mini_batches optimizer steps per epoch,
    args.update_epochs epochs, one forward per micro-batch of args.micro_batch_tokens padded
    tokens. Every rank runs as many forwards (FSDP collectives); the token-mean is over the
    mini-batch's masked tokens on ALL ranks (all-reduced), gradients summed over ranks, so any world
    size and any micro-batch size give the same update. Without "old" the old log-probs are this
    forward's own, detached (fused_old), and the entropy at the policy tokens is summed here.
    Returns summed statistics."""
    fused = not any("old" in t for t in batch)
    assert not fused or fused_old(args), "old log-probs are needed for more than one optimizer step per batch"
    n = len(batch)
    assert n % args.mini_batches == 0, f"{n} trajectories per rank do not split into {args.mini_batches} mini-batches"
    per = n // args.mini_batches
    stats = dict(loss=0.0, clip=0.0, kl=0.0, tokens=0.0, grad_norm=0.0, steps=0, entropy=0.0)
    for _ in range(args.update_epochs):
        for mb in range(args.mini_batches):
            part = batch[mb * per:(mb + 1) * per]
            # normaliser: masked tokens (token-mean) or trajectories (seq-mean) of the global mini-batch
            local = sum(float(t["mask"].sum()) for t in part) if args.aggregation == "token-mean" else float(len(part))
            norm = torch.tensor([local], dtype=torch.float64, device=device)
            dist.all_reduce(norm)
            norm = max(1.0, norm.item())
            for items in rank_micro_batches(part, args.micro_batch_tokens, device):
                out = batch_logprobs(model, items, device, entropy=fused, temperature=args.temperature)
                logp, ent = out if fused else (out, None)
                mask = padded(items, "mask", logp.shape[1], device)
                old = logp.detach() if fused else padded(items, "old", logp.shape[1], device)
                adv = torch.stack([t["adv"] for t in items]).to(device)
                loss = policy_loss(logp, old, adv, mask, args.clip_low, args.clip_high, args.dual_clip,
                                   args.aggregation, normalizer=norm)
                loss.backward()
                with torch.no_grad():
                    r, m, a = torch.exp(logp - old), mask.bool(), adv[:, None]
                    clipped = ((a > 0) & (r > 1 + args.clip_high)) | ((a < 0) & (r < 1 - args.clip_low))
                    stats["loss"] += loss.item()
                    stats["clip"] += float((clipped & m).sum())
                    stats["kl"] += float(((r - 1) - (logp - old))[m].sum())  # k3 estimate of KL(old || new)
                    stats["tokens"] += float(m.sum())
                    stats["entropy"] += float((ent * mask).sum()) if fused else 0.0
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            stats["grad_norm"] += (gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["steps"] += 1
    return stats


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ViLaVT GRPO (paper Eq. 6; clip 0.2/0.3, no KL)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--model", help="SFT checkpoint folder (self-contained: tokenizers inside), or a run's `latest`")
    a("--data", help="RL prompts JSONL (our schema, with answer and problem_type)")
    a("--image-root", default=None, help="folder of the records' image paths; default: --data's folder")
    a("--out-dir", default="out/grpo")
    a("--resume", action="store_true", help="continue out_dir/latest exactly")
    a("--skip-bad", action="store_true")
    data.Initial.add_args(ap)
    a("--plot", default=None, metavar="LOG", help="only draw the training curves of LOG (a log.jsonl) to a PNG")
    # the rollout batch (paper: 96 prompts x 4)
    a("--steps", type=int, default=1200, help="policy steps (release)")
    a("--stop-at-step", type=int, default=-1, help="stop after this step as if killed (schedule unchanged)")
    a("--prompts-per-step", type=int, default=96, help="prompts per step over all ranks (paper)")
    a("--group-size", type=int, default=4, help="G rollouts per prompt (paper)")
    a("--max-tool-calls", type=int, default=5, help="T_max for records without max_tool_calls (5 general, 10 spatial)")
    a("--max-turn-tokens", type=int, default=1024, help="policy tokens per turn")
    a("--max-new-tokens", type=int, default=4096, help="policy tokens per trajectory")
    a("--max-context", type=int, default=16384, help="KV-cache slots per rollout row")
    a("--temperature", type=float, default=1.0, help="sampling temperature (release trained at 1.0; paper 0.75)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling (paper 0.9)")
    a("--total-visual-tokens", type=int, default=8192)
    a("--max-pixels", type=int, default=0, help="per original image; 0 = share --total-visual-tokens evenly")
    # the update (paper Eq. 6 and the release's extras)
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.3)
    a("--dual-clip", type=float, default=None, help="cap the loss of A<0 tokens at -c*A (release: 3.0)")
    a("--aggregation", choices=("token-mean", "seq-mean"), default="token-mean",
      help="token-mean over all masked tokens, or mean over trajectories of their token means (release option)")
    a("--mini-batches", type=int, default=1, help="optimizer steps per epoch over one rollout batch")
    a("--micro-batch-tokens", type=int, default=16384,
      help="trajectories per forward of the learner, by padded tokens (rows x longest); 0: one per forward")
    a("--update-epochs", type=int, default=1, help="passes over one rollout batch")
    a("--lr", type=float, default=1e-6, help="constant AdamW lr (release)")
    a("--weight-decay", type=float, default=1e-2)
    a("--grad-clip", type=float, default=1.0)
    a("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
      help="freeze the whole ViT incl. instruct projections and text_proj (the release froze it in RL)")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    a("--seed", type=int, default=0, help="prompt order and sampling")
    a("--save-every", type=int, default=50)
    a("--dump-every", type=int, default=10, help="write decoded trajectories every N steps (0: never)")
    a("--bench", action="store_true", help="time a few steps (rollout / old log-probs / update), and the learner "
                                           "against --micro-batch-tokens 0 on the same rollouts; write nothing")
    args = ap.parse_args(argv)
    if args.plot is None and (args.model is None or args.data is None):
        ap.error("--model and --data are required (except with --plot)")
    args.train_text_proj = not args.freeze_vision  # text_proj belongs to the vision side (see sft.build_model)
    return args


RESUME_KEYS = ("data", "image_root", "steps", "prompts_per_step", "group_size", "lr", "seed", "clip_low",
               "clip_high", "dual_clip", "aggregation", "mini_batches", "update_epochs", "freeze_vision",
               "initial_groups", "initial_inquiry")


# -----------------------------------------------------------------------------
# training


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    with distributed() as (rank, world, device):
        train(args, rank, world, device)


def train(args, rank, world, device):
    P, G = args.prompts_per_step, args.group_size
    if P % world:
        raise SystemExit(f"--prompts-per-step {P} is not a multiple of the world size {world}")
    model_dir = resolve_checkpoint(args.model)
    args.image_root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    ckpt, meta, init_from = start_point(args, RESUME_KEYS, model_dir)  # init_from: the SFT model
    if ckpt is not None:
        model_dir = ckpt

    # ---- model, tokenizers, prompts, optimizer
    model, cfg = build_model(model_dir, None, args, device, rank)
    ct = data.ChatTokenizer.load(model_dir, cfg)
    # a record's own max_pixels (e.g. the zoom world's display size) wins over --max-pixels
    budget = data.Budget(total_tokens=args.total_visual_tokens, max_pixels=args.max_pixels or None)
    records, n_bad = load_prompts(args.data, args.image_root, args.skip_bad, ct, budget, args.max_context)
    initial = data.Initial.from_args(args)  # the originals' encoder groups and inquiry, every step
    limits = rollout.Limits(max_tool_calls=args.max_tool_calls, max_turn_tokens=args.max_turn_tokens,
                            max_new_tokens=args.max_new_tokens, max_context=args.max_context)
    opt = make_optimizer(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    start = 0
    if meta is not None:
        start = meta["step"]
        restore(model, opt, ckpt, meta, rank)
    end = min(args.steps, args.stop_at_step) if args.stop_at_step > 0 else args.steps
    if args.bench:
        end = min(end, start + 4)  # 1 warm-up step + 3 timed
    print0(f"{len(records)} prompts ({n_bad} bad) | {P} prompts x G={G} per step over {world} rank(s) | "
           f"{args.steps} steps | lr {args.lr} | {sum(p.numel() for p in params) / 1e6:.2f}M trainable params")
    log = dumps = None
    if rank == 0 and not args.bench:  # on resume both drop the steps past the checkpoint: they are redone
        log = open_log(args.out_dir, start, meta is not None)
        dumps = open_log(args.out_dir, start, meta is not None, "trajectories.jsonl")
    bar = tqdm(total=end, initial=start, disable=rank != 0, dynamic_ncols=True)
    bench = []  # --bench: seconds per step (rollout, old log-probs, update, and both one trajectory per forward)

    step = start
    while True:
        last_step = step >= end
        if not args.bench and step > start and (last_step or step % args.save_every == 0):
            run_meta = dict(step=step, num_steps=args.steps, args=vars(args), config=config_to_hf(cfg),
                            world_size=world, init_from=init_from)
            save(args.out_dir, step, model, opt, cfg, (ct.tok, ct.qtok), run_meta, model_dir, rank)
        if last_step:
            break

        # ---- 1. rollouts: this rank's prompts x G, on full weights
        t0 = time.perf_counter()
        idx = prompt_order(step, P, len(records), args.seed)
        mine = list(range(rank, P, world))  # global prompt numbers of this rank
        used, prompts, skipped = make_prompts(records, [idx[j] for j in mine], args.image_root, budget, args.skip_bad,
                                              initial)
        # each prompt's samples are seeded by its global number in the run, not by the rank that rolls it out
        prompts = [dataclasses.replace(p, seed=args.seed * 1_000_003 + step * P + j) for p, j in zip(prompts, mine)]
        model.eval()
        unsharded(model, True)
        sampling = rollout.Sampling(args.temperature, args.top_p)
        with torch.no_grad():
            trajs = rollout.rollout(model, ct, prompts, G, sampling, limits, budget)
        unsharded(model, False)
        model.train()
        t1 = time.perf_counter()

        # ---- 2-4. scores; rewards of every group gathered over ranks; advantages
        scores = [score(t, records[used[i // G]][1]) for i, t in enumerate(trajs)]
        adv = gathered_advantages([s["reward"] for s in scores], mine, P, G, device)

        # (--bench: first the same learner one trajectory per forward, timed for the comparison)
        per_traj = (0.0, 0.0)
        if args.bench:
            ta = time.perf_counter()
            b0 = learner_batch(ct, trajs, adv)
            old_logprobs(model, b0, device, 0, args.temperature)
            tb = time.perf_counter()
            update(model, opt, params, b0, argparse.Namespace(**dict(vars(args), micro_batch_tokens=0)), device)
            per_traj = (tb - ta, time.perf_counter() - tb)

        # ---- 5. old log-probs on exactly the rollout tokens (and the policy's entropy), in their
        # own pass only where the update takes more than one optimizer step (fused_old)
        batch = learner_batch(ct, trajs, adv)
        ent = None if fused_old(args) else old_logprobs(model, batch, device, args.micro_batch_tokens, args.temperature)
        t2 = time.perf_counter()

        # ---- 6. the Eq. 6 updates
        for g in opt.param_groups:
            g["lr"] = args.lr * g["lr_scale"]  # constant (release)
        st = update(model, opt, params, batch, args, device)
        ent = st["entropy"] if ent is None else ent
        t3 = time.perf_counter()
        step += 1

        # ---- metrics, summed over ranks
        gen = sum(sum(t.policy_mask) for t in trajs)
        seen = sum(len(t.ids) for t in trajs) * args.update_epochs
        vec = torch.tensor([len(trajs), sum(s["reward"] for s in scores), sum(s["correct"] for s in scores),
                            sum(s["format"] for s in scores), sum(s["correct"] == 1 for s in scores), gen,
                            sum(t.n_tool_calls for t in trajs), sum(t.n_invalid for t in trajs), st["loss"],
                            st["clip"], st["kl"], st["tokens"], ent, seen, skipped], dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        (n, rew, cor, fmt, acc, gen, tools, inval, loss, clip, kl, toks, ent, seen, skipped) = vec.tolist()
        rec = dict(step=step, reward=rew / n, correct=cor / n, format=fmt / n, accuracy=acc / n,
                   response_len=gen / n, tool_calls=tools / n, invalid_rate=inval / max(1, tools),
                   loss=loss / max(1, st["steps"]), clip_frac=clip / max(1, toks), approx_kl=kl / max(1, toks),
                   entropy=ent / max(1, gen), grad_norm=st["grad_norm"] / max(1, st["steps"]),
                   rollout_tok_s=gen / (t1 - t0), update_tok_s=seen / (t3 - t2),
                   rollout_s=t1 - t0, old_logp_s=t2 - t1 - sum(per_traj), update_s=t3 - t2, skipped=int(skipped))
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if dumps is not None and args.dump_every and step % args.dump_every == 0:
            dump(dumps, step, trajs, scores, adv)
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}", tools=f"{rec['tool_calls']:.2f}")
        if args.bench and step > start + 1:  # the first step warms up
            bench.append((rec["rollout_s"], rec["old_logp_s"], rec["update_s"], *per_traj))
        if rank == 0 and (step % 5 == 0 or step == start + 1 or args.bench):
            bar.write(f"step {step:4d} | reward {rec['reward']:.3f} | acc {rec['accuracy']:.3f} | format "
                      f"{rec['format']:.2f} | tools {rec['tool_calls']:.2f} | len {rec['response_len']:.0f} | clip "
                      f"{rec['clip_frac']:.3f} | kl {rec['approx_kl']:.4f} | time rollout {rec['rollout_s']:.1f}s "
                      f"old-logp {rec['old_logp_s']:.1f}s update {rec['update_s']:.1f}s")
    bar.close()
    for f in (log, dumps):
        if f is not None:
            f.close()
    if bench:
        roll, old, upd, old0, upd0 = (sum(x) / len(bench) for x in zip(*bench))
        print0(f"bench: mean per step over {len(bench)} steps: rollout {roll:.2f} s | one trajectory per forward: "
               f"old log-probs {old0:.2f} s, update {upd0:.2f} s | --micro-batch-tokens {args.micro_batch_tokens}: "
               f"old log-probs {'in the update' if fused_old(args) else f'{old:.2f} s'}, update {upd:.2f} s | "
               f"learner {(old0 + upd0) / (old + upd):.2f}x faster (the update alone {upd0 / upd:.2f}x)")


def dump(f, step, trajs, scores, adv):
    """Decoded trajectories with rewards and every crop's box, for inspection (trajectories.jsonl)."""
    for t, s, a in zip(trajs, scores, adv):
        crops = [dict(index=i, parent=v.parent, bbox=v.bbox, region=[round(x, 4) for x in v.region],
                      group=v.group) for i, v in enumerate(t.context.views) if v.bbox is not None]
        f.write(json.dumps(dict(step=step, turns=t.turns, finish=t.finish, reward=s["reward"],
                                correct=s["correct"], format=s["format"], advantage=float(a), crops=crops,
                                queries=t.context.queries, errors=t.errors)) + "\n")
    f.flush()


# -----------------------------------------------------------------------------
# training-dynamics figure (like the paper's Figure 9)


def plot(log_path):
    """One PNG next to LOG (log.png) with a panel per curve, linear axes, step on x."""
    with open(log_path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    if not rows:
        raise SystemExit(f"{log_path}: empty log")
    curves = [("reward", "mean reward"), ("accuracy", "accuracy"), ("format", "format rate"),
              ("tool_calls", "tool calls / trajectory"), ("response_len", "response length (tokens)"),
              ("invalid_rate", "invalid-call rate"), ("clip_frac", "clip fraction"), ("approx_kl", "approx. KL to old"),
              ("entropy", "entropy"), ("grad_norm", "grad norm"), ("rollout_tok_s", "rollout tokens/s"),
              ("update_tok_s", "update tokens/s")]
    path = os.path.splitext(log_path)[0] + ".png"
    plots.plot_panels([(label, {r["step"]: r[key] for r in rows}) for key, label in curves], path)
    print(path)
    return path


if __name__ == "__main__":
    main()
