"""
The training plumbing that sft.py and grpo.py share, so that each script shows only its own
algorithm (nanochat's common.py + checkpoint_manager.py in one file):

- torchrun setup / teardown and print0: a plain `python sft.py` is a world of one, so every
  launch runs one code path, FSDP included;
- build_model: every rank builds the model on the meta device, FSDP2-shards it (one unit per
  decoder block and per vision block, then the root), and rank 0's checkpoint is broadcast in;
- the AdamW optimizer and the warmup + cosine LR schedule;
- checkpoints: atomic writes (temp folder renamed into place, then `latest` swapped), the
  per-rank RNG states, the sharded optimizer state, and --resume (start_point, restore);
- micro-batches: sequences grouped by padded tokens into right-padded forwards, as many on every
  rank (sft.py's samples, grpo.py's trajectories);
- the run's JSONL log, cut back to the checkpoint's step on resume (the later steps are redone).

Checkpoint layout (every write goes to a temp dir that is renamed into place, then `latest` is
replaced atomically; a run killed mid-save leaves the previous checkpoint intact):

    out_dir/latest                  symlink -> step_000120 (a model folder itself)
    out_dir/log.jsonl               one line per step
    out_dir/step_000120/            a self-contained HF folder: eval.py / grpo.py / --model load it
        config.json, model.safetensors (or shards + index; fp32 master weights)
        tokenizer files, query_tokenizer/ (the inquiry tokenizer)
        meta.json                   step, args, config, init_from, per-rank RNG states
        optim/                      AdamW state, one safetensors file per rank (no pickle: see save_optimizer)
"""

import contextlib
import json
import math
import os
import random
import shutil

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

import data  # (data.unique_groups looked up at call time: memplan replaces it)
from model import ViLaVT, config_from_hf, read_json, save_checkpoint

# -----------------------------------------------------------------------------
# Distributed setup / teardown


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def warn(msg):  # any rank, any data-loader worker
    print(f"[rank {os.environ.get('RANK', 0)}] {msg}", flush=True)


def dist_setup():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous); a plain `python sft.py` is a
    world of one, so there is one code path (FSDP included) for every launch. Returns
    (rank, world size, device)."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU: the cores shared out among this node's processes unless asked otherwise (torch's
        # default gives every process all cores: with several processes, spinning OpenMP threads
        # made a step 10-30x slower, measured). One process on 2 cores: 1.2x faster than 1 thread.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def dist_teardown(barrier=True):
    """barrier: every rank got here without an error, so they first meet, and no rank closes its
    connections while another is still busy (rank 0 writing a checkpoint). After an error there is
    no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed():
    """`with distributed() as (rank, world, device):` the scripts' one setup/teardown pair: the
    teardown meets at a barrier when the body finished, and skips it after an error."""
    rank, world, device = dist_setup()
    try:
        yield rank, world, device
    except BaseException:
        dist_teardown(barrier=False)  # the other ranks may never reach a barrier
        raise
    dist_teardown()



# -----------------------------------------------------------------------------
# Model and optimizer


def build_model(model_dir, embedder_dir, args, device, rank):
    """Every rank builds the model on the meta device and shards it; rank 0 alone reads the
    checkpoint (fp32, CPU) and the weights are broadcast into the shards, so host memory holds
    one full copy per node-rank-0, not one per GPU."""
    d = read_json(os.path.join(model_dir, "config.json"))
    emb = read_json(os.path.join(embedder_dir, "config.json")) if embedder_dir else None
    if emb is not None and d.get("model_type") == "vilavt":  # (checked on every rank, before any collective)
        raise SystemExit(f"{model_dir} is already a ViLaVT checkpoint with its own text encoder: drop --embedder")
    cfg = config_from_hf(d, emb, os.path.join(model_dir, "config.json"))
    full = {}
    if rank == 0:
        torch.manual_seed(args.seed)  # the new layers' N(0, 0.02) init when starting from stock + embedder
        full = ViLaVT.from_pretrained(model_dir, embedder_dir, dtype=torch.float32, device="cpu").state_dict()
    model = sharded_model(cfg, args, mixed_precision=device.type == "cuda")  # CPU: fp32 throughout
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model.train(), cfg


def sharded_model(cfg, args, mixed_precision):
    """The model as build_model shapes it, still on the meta device (no weights): what trains,
    activation checkpointing, the FSDP2 units and their settings. Its own function so that
    `bench.py plan` (memplan.py) runs the same build on fake tensors. mixed_precision: bf16
    compute with fp32 gradient reduction (GPU), else fp32 throughout."""
    with torch.device("meta"):
        model = ViLaVT(cfg)
    # what trains (SPEC 2): never the inquiry text encoder; text_proj and the ViT by flag
    if model.is_vilavt:
        model.text_encoder.requires_grad_(False)
        model.text_proj.requires_grad_(args.train_text_proj)
    if args.freeze_vision:
        model.visual.requires_grad_(False)
    model.checkpointing = model.visual.checkpointing = args.activation_checkpointing
    # FSDP2: one unit per decoder block and per vision block, the rest (embeddings, lm_head,
    # patch embed, merger, text encoder, text_proj) in the root unit.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    for block in list(model.model.layers) + list(model.visual.blocks):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden_states")  # the training forward is not model.forward
    for name in ("set_force_sum_reduction_for_comms", "set_reduce_scatter_unused_params"):
        if not hasattr(FSDPModule, name):
            raise SystemExit(f"training needs FSDPModule.{name}, which torch {torch.__version__} lacks: upgrade torch")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Gradients are summed over ranks, not averaged: the loss is already divided by the
            # global token count (see the training step).
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
            # A rank whose samples carry no inquiry leaves text_proj / instruct_* without a gradient
            # while other ranks have one: reduce zeros for them, or the collectives mismatch.
            m.set_reduce_scatter_unused_params(True)
    return model


def make_optimizer(model, args):
    """AdamW; each group's `lr_scale` multiplies the scheduled lr: 1, or for the vision tower
    (`visual.*`) --vision-lr / --lr where a script has that flag (a tiny model trained from random
    weights needs its tower slower than its LM: README, "Learning to look")."""
    vision_lr = getattr(args, "vision_lr", None)
    scale = lambda name: vision_lr / args.lr if vision_lr is not None and name.startswith("visual.") else 1.0
    groups = {}
    for n, p in model.named_parameters():
        if p.requires_grad:  # matrices decay; biases and norms do not
            wd = args.weight_decay if p.dim() >= 2 else 0.0
            groups.setdefault((wd, scale(n)), []).append(p)
    groups = [{"params": ps, "weight_decay": wd, "lr_scale": s} for (wd, s), ps in groups.items()]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, total, peak, warmup):
    """Linear warmup over the first `warmup` fraction of the steps, then cosine decay to 0."""
    n_warm = max(1, math.ceil(warmup * total))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


# -----------------------------------------------------------------------------
# Micro-batches: several sequences in one forward (sft.py's samples, grpo.py's trajectories)

PAD = 0  # any text token: right padding is inert under causal attention, and its targets are -100
# A forward's fixed cost in padded tokens: what a micro-batch split must save to be worth a forward.
# On the demo's CPU a call costs ~25 ms of overhead, ~400 padded tokens of the tiny model; on GPUs
# FSDP all-gathers the weights once per forward. A round figure: the split is not sensitive to it.
FORWARD_COST = 512


def micro_batches(lengths, budget, n_groups=None, forward_cost=FORWARD_COST):
    """Sequences grouped for one forward each: sorted by length, cut into contiguous groups
    whose padded size (rows x the longest row) stays within `budget` tokens (a longer sequence
    alone), with the fewest padded tokens plus `forward_cost` per group (a 1-D partition, solved
    exactly by dynamic programming: filling each group greedily pads 30 short trajectories to the
    longest's length). budget 0: one sequence per group. n_groups: the largest groups are halved
    until there are that many (every rank must run the same number of forwards, for FSDP's
    collectives). Returns lists of indices into lengths."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if budget <= 0:
        groups = [[i] for i in order]
    else:
        L = [lengths[i] for i in order]
        best, cut = [0] + [math.inf] * len(L), [0] * (len(L) + 1)  # the first j sorted: least cost, last cut
        for j in range(1, len(L) + 1):
            for i in range(j - 1, -1, -1):  # the last group is order[i:j], padded to L[j-1]
                size = (j - i) * L[j - 1]
                if size > budget and j - i > 1:
                    break
                if best[i] + size + forward_cost < best[j]:
                    best[j], cut[j] = best[i] + size + forward_cost, i
        groups, j = [], len(L)
        while j:
            groups.insert(0, order[cut[j]:j])
            j = cut[j]
    while n_groups is not None and len(groups) < n_groups:
        k = max(range(len(groups)), key=lambda k: len(groups[k]))
        assert len(groups[k]) > 1, f"{len(lengths)} sequences do not make {n_groups} micro-batches"
        groups[k:k + 1] = [groups[k][:len(groups[k]) // 2], groups[k][len(groups[k]) // 2:]]
    return groups


def padded_forward(model, rows, encs, device, share=False):
    """One LM forward over a micro-batch of token rows (1-D sequences): (ids (rows, T), hidden
    states (rows, T, d)). Rows are right padded with PAD (inert under causal attention: no real
    token sees it); every row's images go through one vision-encoder call. share: each repeated
    encoder group encoded once (data.unique_groups, exact: a prompt's G rollouts, or a probe's
    candidates, share their originals; SFT samples seldom do, and memplan's fake tensors cannot
    compare pixels). sft.py's loss, grpo.py's log-probs and the demo's probes run this forward."""
    assert model.cfg.lm.image_token_id != PAD, "the padding token must be a text token"
    ids = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
    enc = data.Context.merge_encoder_inputs(encs)
    enc = data.unique_groups(enc) if share else enc
    ids = ids.to(device)
    return ids, model.hidden_states(ids, **{k: v.to(device, non_blocking=True) for k, v in enc.items()})


def rank_micro_batches(batch, budget, device, key="ids"):
    """This rank's micro-batches (lists of items of `batch`, an item's length that of its
    `key`), as many on every rank (a collective)."""
    lengths = [len(t[key]) for t in batch]
    n = torch.tensor([len(micro_batches(lengths, budget))], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [[batch[i] for i in g] for g in micro_batches(lengths, budget, int(n))]


def padded(items, key, width, device, value=0):
    """(rows, width) from each item's 1-D tensor `key`, right padded with `value`."""
    return torch.stack([F.pad(t[key], (0, width - t[key].shape[0]), value=value) for t in items]).to(device)


# -----------------------------------------------------------------------------
# Checkpoints


def rng_state():
    st = {"python": json.loads(json.dumps(random.getstate())), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def set_rng_state(st):
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def step_name(step):
    return f"step_{step:06d}"


def write_checkpoint(out_dir, step, write, rank):
    """Atomic checkpoint: `write(tmp_dir)` (a collective: every rank calls it) fills a temp dir,
    which rank 0 renames to step_NNNNNN; then `latest` is replaced atomically. An exception or a
    kill anywhere before the rename leaves `latest` on the previous, intact checkpoint."""
    tmp, final = os.path.join(out_dir, ".tmp-" + step_name(step)), os.path.join(out_dir, step_name(step))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier killed save
        os.makedirs(tmp)
    dist.barrier()
    write(tmp)
    dist.barrier()
    if rank == 0:
        old = final + ".old"
        if os.path.exists(final):  # re-saving a step (e.g. an earlier --stop-at-step run ended here)
            os.replace(final, old)
        os.replace(tmp, final)
        # `latest` is a relative symlink, so out_dir/latest is itself a model folder every
        # script (and ViLaVT.from_pretrained) can open; a new link is renamed over the old one
        link = os.path.join(out_dir, "latest.tmp")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(step_name(step), link)
        os.replace(link, os.path.join(out_dir, "latest"))
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save(out_dir, step, model, opt, cfg, toks, meta, source_dir, rank):
    # full fp32 weights gathered to rank 0's CPU (a collective), written as an HF folder
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    osd = get_optimizer_state_dict(model, opt)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())

    def write(tmp):
        if rank == 0:
            save_checkpoint(sd, cfg, tmp)
            toks[0].save_pretrained(tmp)
            if model.is_vilavt:
                toks[1].save_pretrained(os.path.join(tmp, "query_tokenizer"))
            for f in ("preprocessor_config.json", "chat_template.json", "generation_config.json"):  # for HF tools
                if os.path.exists(os.path.join(source_dir, f)):
                    shutil.copy(os.path.join(source_dir, f), tmp)
        dist.barrier()
        save_optimizer(osd, os.path.join(tmp, "optim"), rank)  # each rank writes its own shard
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(meta, rng=rngs), f)

    return write_checkpoint(out_dir, step, write, rank)


# The optimizer state is kept as tensors in safetensors files, one per rank, with nothing to
# unpickle: torch.distributed.checkpoint writes a pickled `.metadata` that loading executes, so a
# crafted run folder could run code on --resume. The price: a run resumes on the world size that
# saved it (DCP could reshard).


def optim_file(folder, rank):
    return os.path.join(folder, f"rank{rank:05d}-of-{dist.get_world_size():05d}.safetensors")


def save_optimizer(osd, folder, rank):
    """This rank's shard of the optimizer state (get_optimizer_state_dict) as safetensors: the key
    of param p's state s is "p/s"; sharded tensors are saved as this rank's local part. The param
    groups are rebuilt from the flags on resume (the LR is set at every step)."""
    flat = {}
    for name, state in osd["state"].items():
        for k, v in state.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {name}/{k} is a {type(v).__name__}, not a tensor")
            flat[f"{name}/{k}"] = (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(flat, optim_file(folder, rank))


def load_optimizer(model, opt, folder, rank):
    """Restore this rank's shard saved by save_optimizer into `opt`, checking every key and shape;
    a missing, truncated or mismatched file stops with an error naming it."""
    path = optim_file(folder, rank)
    if os.path.exists(os.path.join(folder, ".metadata")) and not os.path.exists(path):
        raise SystemExit(f"{folder} holds torch.distributed.checkpoint's format (an earlier version of this code), "
                         "which --resume no longer reads because loading it unpickles; start a new run from this "
                         "checkpoint's weights (--model) instead")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: the run is resumed on a world size ({dist.get_world_size()}) other than "
                         f"the one that saved it ({', '.join(sorted(os.listdir(folder))) or 'no shards'})")
    osd = get_optimizer_state_dict(model, opt)  # the layout, with this rank's shapes
    want = {f"{n}/{k}": v for n, state in osd["state"].items() for k, v in state.items()}
    try:
        with safe_open(path, framework="pt") as f:
            missing, unexpected = sorted(set(want) - set(f.keys())), sorted(set(f.keys()) - set(want))
            if missing or unexpected:
                raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            for key, v in want.items():
                t, local = f.get_tensor(key), v.to_local() if isinstance(v, DTensor) else v
                if t.shape != local.shape:
                    raise ValueError(f"{key}: saved {tuple(t.shape)}, the model has {tuple(local.shape)}")
                local.copy_(t)
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path}: unreadable optimizer state ({e})") from None
    set_optimizer_state_dict(model, opt, osd)


def start_point(args, keys, model_dir):
    """Where a run starts: (checkpoint, its meta.json, init_from). With --resume the run's
    `latest` (None: starting fresh), after checking that no flag in `keys` (those that define
    the run's math and data order) changed since it was written; without it, a folder that
    already holds a run is refused. init_from, kept in every checkpoint, is the model the run
    first started from (model_dir, or what the resumed checkpoint recorded)."""
    held = holds_run(args.out_dir)
    if not args.resume and not args.bench and held:
        raise SystemExit(f"{args.out_dir} already holds a run ({held}); pass --resume to continue it, or another "
                         "--out-dir")
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    init_from = os.path.abspath(model_dir)
    if ckpt is None:
        if args.resume and held:  # never retrain from step 0 over a run's log and checkpoints
            raise SystemExit(f"--resume: {args.out_dir} holds a run ({held}) but no complete checkpoint; "
                             "remove the folder to start afresh, or pass another --out-dir")
        if args.resume:
            print0(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
        return None, None, init_from
    meta = read_json(os.path.join(ckpt, "meta.json"))
    changed = [f"--{k.replace('_', '-')} {meta['args'][k]!r} -> {getattr(args, k)!r}" for k in keys
               if k in meta["args"] and meta["args"][k] != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume from {ckpt} with changed flags: {'; '.join(changed)}")
    # a flag newer than the checkpoint: its default reproduces the run's math as it was written
    newer = [f"--{k.replace('_', '-')} {getattr(args, k)!r}" for k in keys if k not in meta["args"]]
    if newer:
        print0(f"--resume: {ckpt} predates {', '.join(newer)}; keep each flag at its default to continue the run "
               "as it was")
    print0(f"resuming from {ckpt} (step {meta['step']})")
    return ckpt, meta, meta.get("init_from", init_from)


def restore(model, opt, ckpt, meta, rank):
    """Resume: this rank's shard of the AdamW state and its RNG state (the weights were loaded
    from the checkpoint folder itself)."""
    load_optimizer(model, opt, os.path.join(ckpt, "optim"), rank)
    set_rng_state(meta["rng"][rank % len(meta["rng"])])


def complete(step_dir):
    """A checkpoint folder holds its config and, written last, its meta.json."""
    return all(os.path.isfile(os.path.join(step_dir, f)) for f in ("config.json", "meta.json"))


def latest_checkpoint(out_dir):
    """The step folder out_dir/latest points to; if that link dangles or its folder is not
    complete, the newest complete step_NNNNNN folder (said aloud); None if there is none."""
    p = os.path.join(out_dir, "latest")
    if os.path.islink(p) and complete(p):
        return os.path.join(out_dir, os.readlink(p))
    steps = sorted(d for d in os.listdir(out_dir) if d.startswith("step_")) if os.path.isdir(out_dir) else []
    for d in reversed(steps):
        if complete(os.path.join(out_dir, d)):
            if os.path.lexists(p):
                print0(f"{p} -> {os.readlink(p)} is missing or incomplete; the newest complete checkpoint is {d}")
            return os.path.join(out_dir, d)
    return None


def holds_run(out_dir):
    """What in out_dir shows that a run wrote there (a checkpoint, the `latest` link, the log), or None."""
    if not os.path.isdir(out_dir):
        return None
    found = [d for d in sorted(os.listdir(out_dir)) if d.startswith("step_") or d in ("latest", "log.jsonl")]
    return ", ".join(found) or None


def resolve_checkpoint(path):
    """A model folder, out_dir/latest, or a run folder holding a `latest` -> the step folder
    (resolved, so meta.json and resume refer to a fixed step)."""
    if os.path.islink(path) and os.path.basename(path) == "latest":
        return latest_checkpoint(os.path.dirname(path))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and latest_checkpoint(path):
        return latest_checkpoint(path)
    return path


# -----------------------------------------------------------------------------
# The run's log


def open_log(out_dir, start_step, resumed, name="log.jsonl"):
    """Rank 0: out_dir/name opened for appending one JSON line per step, with the run folder made
    and the debris of saves killed before their rename removed. A resumed run keeps the lines up
    to its checkpoint's step and drops the later ones (those steps are redone); a fresh run
    starts the file empty."""
    os.makedirs(out_dir, exist_ok=True)
    for d in os.listdir(out_dir):
        if d.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    path, keep = os.path.join(out_dir, name), []
    if resumed and os.path.exists(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
    log = open(path, "w")
    log.writelines(keep)
    log.flush()
    return log
