"""
Supervised fine-tuning of ViLaVT (paper Eq. 4): maximum likelihood of the assistant's tokens of
gold "chatting with images" trajectories; crops are cut on the fly by the crop rule (data.py).

    python sft.py                      # CPU demo: tiny random ViLaVT on the synthetic zoom world
    python sft.py --bench              # tokens/s of the current config (no checkpoints)
    torchrun --nproc_per_node 8 sft.py --model Qwen2.5-VL-7B-Instruct --embedder Qwen3-Embedding-0.6B \
        --data train.jsonl --image-root images/
    torchrun --nproc_per_node 8 sft.py --model ViLaVT-ckpt --data ViLaVT-Data/sft.json \
        --image-root ViLaVT-Data/ --import-release          # the authors' released records
    ... same command + --resume                             # continue out_dir/latest exactly

Multi-node: torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint ...); the out dir must be
on a filesystem all nodes share. Distributed layout: FSDP2 (`fully_shard`) on every decoder block,
every vision block, then the root; bf16 compute with fp32 master weights and fp32 gradient
reduction on GPU, plain fp32 on CPU (gloo). Micro-batch = one sample (no packing, as the release);
gradient accumulation up to --global-batch. The loss is the token-weighted mean over the whole
global batch, so any world size / accumulation split gives the same gradient.

Checkpoint layout (every write goes to a temp dir that is renamed into place, then `latest` is
replaced atomically; a run killed mid-save leaves the previous checkpoint intact):

    out_dir/latest                  symlink -> step_000120 (a model folder itself)
    out_dir/log.jsonl               one line per step: loss, lr, grad_norm, tokens/s, memory
    out_dir/step_000120/            a self-contained HF folder: eval.py / grpo.py / --model load it
        config.json, model.safetensors (or shards + index; fp32 master weights)
        tokenizer files, query_tokenizer/ (the inquiry tokenizer)
        meta.json                   step, data position, args, config, per-rank RNG states
        optim/                      AdamW state, sharded per rank (torch.distributed.checkpoint)
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import AutoTokenizer

import data
from data import Budget, ChatTokenizer, RecordError, TrajectoryDataset
from model import ViLaVT, config_from_hf, config_to_hf, read_json, save_checkpoint, tiny_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data-loader workers fork after the tokenizers ran

# -----------------------------------------------------------------------------
# CLI

# Flags whose default depends on the run: the real 7B (paper / release) or the tiny CPU demo.
DEFAULTS_7B = dict(lr=1e-5, global_batch=384, epochs=2, activation_checkpointing=True)
# The demo's batch is small on purpose: each sample is its own micro-batch anyway, so batch 2
# costs what batch 8 does per sample but gives 4x the optimizer steps, and the tiny model's
# copying skills (the card's colour from the question) only formed with more steps (measured:
# 384 steps of 8 left its colour at chance, 7/33).
DEFAULTS_TINY = dict(lr=1e-3, global_batch=2, epochs=1, activation_checkpointing=False)
TINY_ZOOM = dict(n_train=3072, n_eval=128, seed=0)  # the demo's synthetic data (out/zoom)
SMOKE_ZOOM = dict(n_train=16, n_eval=8, seed=0)  # --smoke: the same sequence in miniature (out/smoke/zoom)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ViLaVT SFT (paper Eq. 4). With no --model: the tiny CPU demo run. "
                                             "Where the 7B and the demo defaults differ, both are given.")
    a = ap.add_argument
    # model and data
    a("--model", help="stock Qwen2.5-VL folder (with --embedder) or a ViLaVT checkpoint folder (or a run's "
                      "`latest` file) (default: the demo's tiny random ViLaVT, built in out/tiny-base)")
    a("--embedder", help="Qwen3-Embedding folder: builds ViLaVT from a stock Qwen2.5-VL --model")
    a("--data", help="training JSONL, our schema (default: the demo's out/zoom/train.jsonl)")
    a("--image-root", help="folder the records' image paths are relative to (default: --data's folder)")
    a("--import-release", action="store_true",
      help="--data is the authors' released SFT file (JSON list or JSONL of {images, conversations, queries, "
           "image_to_query_mapping}): converted to out_dir/imported.jsonl, pre-made crop files kept")
    a("--skip-bad", action="store_true", help="skip (and log) bad records instead of stopping")
    a("--out-dir", help="checkpoints and log.jsonl (default: out/sft; the demo: see --vanilla, --smoke)")
    a("--resume", action="store_true", help="continue out_dir/latest exactly (starts fresh if there is none)")
    # optimisation
    a("--epochs", type=int, help="7B: 2 (paper; the release ran 3); demo: 1")
    a("--max-steps", type=int, default=-1, help="schedule length in optimizer steps (default: from --epochs)")
    a("--stop-at-step", type=int, default=-1,
      help="save and stop after this step, as if the job were killed; the schedule is unchanged")
    a("--global-batch", type=int, help="samples per optimizer step over all ranks; 7B: 384 (paper, release); demo: 2")
    a("--lr", type=float, help="peak AdamW lr; 7B: 1e-5 (paper sec. 4.1; the release script and the paper's "
                               "App. C used 5e-5); demo: 1e-3")
    a("--warmup", type=float, default=0.03, help="linear warmup share of the steps, then cosine to 0 (default: 0.03)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay of matrices (default: 0, as the release)")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (default: 1.0)")
    a("--seed", type=int, default=0, help="data order (a seeded permutation per epoch) and new-layer init")
    # sequence and image budgets (SPEC 3, 7)
    a("--max-length", type=int, default=24576,
      help="samples longer than this many tokens are DROPPED (logged), not truncated (default: 24576, the release)")
    a("--max-pixels", type=int, default=200704, help="max pixels per original image (default: 200704 = 256 "
                                                     "tokens, the release's SFT); 0: share --total-visual-tokens")
    a("--min-pixels", type=int, default=3136, help="min pixels per image (default: 3136)")
    a("--total-visual-tokens", type=int, default=8192, help="per-sample budget; also caps each crop (default: 8192)")
    # what trains (SPEC 2): the inquiry text encoder is always frozen
    a("--train-text-proj", action="store_true", help="train text_proj (the release froze it during SFT)")
    a("--freeze-vision", action="store_true", help="freeze the whole ViT, instruct projections included")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction,
      help="recompute decoder and vision blocks in backward; 7B: on (as the release); demo: off")
    # io
    a("--save-every", type=int, default=100, help="checkpoint every N steps (0: never) and at the end (default: 100)")
    a("--num-workers", type=int, help="data-loading processes (default: 4 on GPU, 0 on CPU)")
    a("--bench", action="store_true", help="time a few steps of this config, print tokens/s, write nothing")
    # the CPU demo's variants (no --model)
    a("--vanilla", action="store_true", help="demo: train the vanilla-encoder counterpart (a tiny stock Qwen2.5-VL, "
                                             "no inquiry path; the paper's 'w/ vanilla ViT') into out/sft-vanilla")
    a("--smoke", action="store_true", help="demo: the same run in miniature (16 samples, 8 steps) under out/smoke/, "
                                           "to check that every stage runs and hands on its checkpoint (CI)")
    args = ap.parse_args(argv)
    if args.model is not None and (args.vanilla or args.smoke):
        ap.error("--vanilla and --smoke are demo flags: they do not go with --model")
    for k, v in (DEFAULTS_TINY if args.model is None else DEFAULTS_7B).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data is None and args.model is not None:
        ap.error("--data is required with --model")
    if args.out_dir is None:
        args.out_dir = demo_dir("sft", args.smoke, args.vanilla)
    if args.embedder is not None and args.model is None:
        ap.error("--embedder needs --model (a stock Qwen2.5-VL folder)")
    return args


# Flags that must not change across --resume (they define the run's math and data order).
RESUME_KEYS = ("data", "image_root", "import_release", "epochs", "max_steps", "global_batch", "lr", "warmup",
               "weight_decay", "grad_clip", "seed", "max_length", "max_pixels", "min_pixels",
               "total_visual_tokens", "train_text_proj", "freeze_vision", "skip_bad")

# -----------------------------------------------------------------------------
# Distributed setup / teardown


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def warn(msg):  # any rank, any data-loader worker
    print(f"[rank {os.environ.get('RANK', 0)}] {msg}", flush=True)


def dist_setup():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous); a plain `python sft.py` is a
    world of one, so there is one code path (FSDP included) for every launch."""
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


def dist_teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# The tiny demo: synthetic zoom-world data, a byte-level tokenizer, a random tiny ViLaVT


def demo_dir(stage, smoke=False, vanilla=False):
    """Where the CPU demo keeps a stage ("zoom", "tiny-base", "sft", "grpo", "demo"): out/<stage>,
    out/<stage>-vanilla for the vanilla-encoder pipeline, all under out/smoke/ for --smoke runs.
    sft.py, grpo.py and eval.py hand their checkpoints on through these paths."""
    return os.path.join("out", "smoke" if smoke else "", stage + ("-vanilla" if vanilla else ""))


def build_tiny_base(out_dir, seed=0, vanilla=False):
    """A random tiny ViLaVT (model.tiny_config) saved as an HF folder with the tiny tokenizer as
    both its LM and its inquiry tokenizer (query_tokenizer/): later stages load it like any
    checkpoint. vanilla: its stock Qwen2.5-VL counterpart (no inquiry path, no query_tokenizer/).
    Built in a temp dir, then renamed into place."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    data.build_tokenizer(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    model = ViLaVT(tiny_config(len(tok), tok.convert_tokens_to_ids("<|image_pad|>"), vanilla))
    model.init_weights()
    model.save_pretrained(tmp)
    if not vanilla:
        tok.save_pretrained(os.path.join(tmp, "query_tokenizer"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def prepare_default(smoke=False, vanilla=False):
    """Build (if missing) the demo's zoom world and tiny base (see demo_dir). Returns both paths."""
    zoom, base = demo_dir("zoom", smoke), demo_dir("tiny-base", smoke, vanilla)
    if not os.path.exists(os.path.join(zoom, "meta.json")):
        shutil.rmtree(zoom + ".tmp", ignore_errors=True)
        n = SMOKE_ZOOM if smoke else TINY_ZOOM
        data.make_zoom_world(zoom + ".tmp", n["n_train"], n["n_eval"], seed=n["seed"])
        shutil.rmtree(zoom, ignore_errors=True)
        os.replace(zoom + ".tmp", zoom)
    if not os.path.exists(os.path.join(base, "config.json")):
        build_tiny_base(base, vanilla=vanilla)
    return base, zoom


# -----------------------------------------------------------------------------
# Model, tokenizers, FSDP


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
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())  # CPU: fp32 throughout
    for block in list(model.model.layers) + list(model.visual.blocks):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden_states")  # the training forward is not model.forward
    for name in ("set_force_sum_reduction_for_comms", "set_reduce_scatter_unused_params"):
        if not hasattr(FSDPModule, name):
            raise SystemExit(f"sft.py needs FSDPModule.{name}, which torch {torch.__version__} lacks: upgrade torch")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Gradients are summed over ranks, not averaged: the loss is already divided by the
            # global token count (see the training step).
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
            # A rank whose samples carry no inquiry leaves text_proj / instruct_* without a gradient
            # while other ranks have one: reduce zeros for them, or the collectives mismatch.
            m.set_reduce_scatter_unused_params(True)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model.train(), cfg


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, total, peak, warmup):
    """Linear warmup over the first `warmup` fraction of the steps, then cosine decay to 0."""
    n_warm = max(1, math.ceil(warmup * total))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


# -----------------------------------------------------------------------------
# Data: a seeded permutation per epoch; global position p -> (epoch p // N, sample perm_epoch[p % N])

SAMPLE_KEYS = ("input_ids", "labels", "pixel_values", "grid_thw", "image_to_query", "query_ids", "query_mask")


def import_release(src, dst, skip_bad):
    """The release's records (a JSON list, or JSONL) -> our JSONL via data.import_release_record.
    Returns (records written, records skipped)."""
    with open(src) as f:
        text = f.read()
    try:
        recs = json.loads(text)
        items = [(f"{src}[{i}]", r) for i, r in enumerate(recs if isinstance(recs, list) else [recs])]
    except json.JSONDecodeError:  # JSONL: one record per line
        items = [(f"{src}:{i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    n_bad = 0
    with open(dst + ".tmp", "w") as f:
        for where, rec in items:
            try:
                if isinstance(rec, str):
                    try:
                        rec = json.loads(rec)
                    except json.JSONDecodeError as e:
                        raise RecordError(f"{where}: malformed JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                f.write(json.dumps(data.import_release_record(rec, where)) + "\n")
            except RecordError as e:
                if not skip_bad:
                    raise
                n_bad += 1
                warn(f"skipping bad release record: {e}")
    os.replace(dst + ".tmp", dst)
    return len(items) - n_bad, n_bad


class Stream(torch.utils.data.Dataset):
    """Global position -> a rendered training sample (tensors only), or {"skip": reason}."""

    def __init__(self, ds, seed, max_length):
        self.ds, self.seed, self.max_length, self.perms = ds, seed, max_length, {}

    def __len__(self):
        return 2**62  # positions run across epochs; the sampler says which ones

    def __getitem__(self, pos):
        epoch, i = divmod(pos, len(self.ds))
        if epoch not in self.perms:
            self.perms = {epoch: torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        s = self.ds[int(self.perms[epoch][i])]
        if s is None:
            return {"skip": "bad record"}
        if len(s["input_ids"]) > self.max_length:
            warn(f"dropping sample {self.ds.records[int(self.perms[epoch][i])][0]}: {len(s['input_ids'])} tokens "
                 f"> --max-length {self.max_length}")
            return {"skip": "too long"}
        return {k: s[k] for k in SAMPLE_KEYS}


def dummy_sample(ct):
    """Stands in for a skipped micro-batch: every rank must run the same forwards/backwards (FSDP
    collectives), and this one has no supervised token, so it adds exactly zero gradient."""
    ids = torch.tensor(ct.image_block(1))
    qids, qmask = ct.queries([""])
    return dict(input_ids=ids, labels=torch.full_like(ids, -100), pixel_values=torch.zeros(4, 1176),
                grid_thw=torch.tensor([[1, 2, 2]]), image_to_query=torch.tensor([0]), query_ids=qids, query_mask=qmask)


def sample_nll(model, s, device):
    """Summed NLL of one sample's supervised tokens (targets = labels shifted left). Goes through
    hidden_states + chunked token_logprobs, never the full fp32 (T x vocab) logits."""
    s = {k: v.to(device, non_blocking=True) for k, v in s.items()}
    targets = torch.cat([s["labels"][1:], s["labels"].new_full((1,), -100)])[None]
    h = model.hidden_states(s["input_ids"][None], s["pixel_values"], s["grid_thw"], s["query_ids"], s["query_mask"],
                            s["image_to_query"])
    return -model.token_logprobs(h, targets).sum()


def n_supervised(s):
    return 0 if "skip" in s else int((s["labels"][1:] != -100).sum())


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
        dcp.save(osd, checkpoint_id=os.path.join(tmp, "optim"))  # each rank writes its own shard
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(meta, rng=rngs), f)

    return write_checkpoint(out_dir, step, write, rank)


def start_point(args, keys, model_dir):
    """Where a run starts: (checkpoint, its meta.json, init_from). With --resume the run's
    `latest` (None: starting fresh), after checking that no flag in `keys` (those that define
    the run's math and data order) changed since it was written; without it, a folder that
    already holds a run is refused. init_from, kept in every checkpoint, is the model the run
    first started from (model_dir, or what the resumed checkpoint recorded)."""
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    if not args.resume and not args.bench and latest_checkpoint(args.out_dir):
        raise SystemExit(f"{args.out_dir} already holds a run (latest: {latest_checkpoint(args.out_dir)}); "
                         "pass --resume to continue it, or another --out-dir")
    init_from = os.path.abspath(model_dir)
    if ckpt is None:
        if args.resume:
            print0(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
        return None, None, init_from
    meta = read_json(os.path.join(ckpt, "meta.json"))
    changed = [f"--{k.replace('_', '-')} {meta['args'].get(k)!r} -> {getattr(args, k)!r}" for k in keys
               if meta["args"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume from {ckpt} with changed flags: {'; '.join(changed)}")
    print0(f"resuming from {ckpt} (step {meta['step']})")
    return ckpt, meta, meta.get("init_from", init_from)


def restore(model, opt, ckpt, meta, rank):
    """Resume: this rank's shard of the AdamW state and its RNG state (the weights were loaded
    from the checkpoint folder itself)."""
    osd = get_optimizer_state_dict(model, opt)
    dcp.load(osd, checkpoint_id=os.path.join(ckpt, "optim"))
    set_optimizer_state_dict(model, opt, osd)
    set_rng_state(meta["rng"][rank % len(meta["rng"])])


def latest_checkpoint(out_dir):
    """The step folder out_dir/latest points to, or None."""
    p = os.path.join(out_dir, "latest")
    return os.path.join(out_dir, os.readlink(p)) if os.path.islink(p) and os.path.isdir(p) else None


def resolve_checkpoint(path):
    """A model folder, out_dir/latest, or a run folder holding a `latest` -> the step folder
    (resolved, so meta.json and resume refer to a fixed step)."""
    if os.path.islink(path) and os.path.basename(path) == "latest":
        return latest_checkpoint(os.path.dirname(path))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and latest_checkpoint(path):
        return latest_checkpoint(path)
    return path


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dist_setup()
    try:
        train(args, rank, world, device)
    finally:
        dist_teardown()


def train(args, rank, world, device):
    G = args.global_batch
    if G % world:
        raise SystemExit(f"--global-batch {G} is not a multiple of the world size {world}")
    accum = G // world  # micro-batches (= samples) per rank per step

    # ---- where the model and the data come from
    model_dir, embedder_dir = resolve_checkpoint(args.model) if args.model else None, args.embedder
    budget = Budget(total_tokens=args.total_visual_tokens, max_pixels=args.max_pixels or None,
                    min_pixels=args.min_pixels)
    if args.model is None:  # the tiny demo
        if rank == 0:
            prepare_default(args.smoke, args.vanilla)
        dist.barrier()
        model_dir, zoom = prepare_default(args.smoke, args.vanilla)  # (already built: just the paths)
        if args.data is None:  # the zoom world's own display budget (its records also carry max_pixels)
            args.data, args.image_root = os.path.join(zoom, "train.jsonl"), zoom
            budget = data.read_budget(zoom)
    args.image_root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    ckpt, meta, init_from = start_point(args, RESUME_KEYS, model_dir)
    if ckpt is not None:
        model_dir, embedder_dir = ckpt, None  # the checkpoint is self-contained
    if args.import_release:
        imported = os.path.join(args.out_dir, "imported.jsonl")
        if rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            n_ok, n_bad = import_release(args.data, imported, args.skip_bad)
            print0(f"imported {n_ok} release records from {args.data} ({n_bad} skipped) -> {imported}")
        dist.barrier()
        data_path = imported
    else:
        data_path = args.data

    # ---- model, tokenizers, data, optimizer
    model, cfg = build_model(model_dir, embedder_dir, args, device, rank)
    ct = ChatTokenizer.load(model_dir, cfg, embedder_dir)
    ds = TrajectoryDataset(data_path, args.image_root, ct, budget, skip_bad=args.skip_bad, log=warn)
    num_steps = args.max_steps if args.max_steps > 0 else args.epochs * len(ds) // G
    if num_steps < 1:
        raise SystemExit(f"{len(ds)} samples x {args.epochs} epochs is less than one global batch of {G}")
    end_step = min(num_steps, args.stop_at_step) if args.stop_at_step > 0 else num_steps
    opt = make_optimizer(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    start_step = 0
    if meta is not None:
        start_step = meta["step"]
        restore(model, opt, ckpt, meta, rank)
    if start_step >= end_step:
        print0(f"nothing to do: {ckpt} is at step {start_step} of {end_step}")
    if args.bench:
        end_step = min(end_step, start_step + 7)  # 2 warm-up steps + 5 timed
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    # rank r's micro-batch j of step s is global position s*G + j*world + r
    positions = [s * G + j * world + rank for s in range(start_step, end_step) for j in range(accum)]
    loader = iter(torch.utils.data.DataLoader(Stream(ds, args.seed, args.max_length), batch_size=None,
                                              sampler=positions, num_workers=workers,
                                              pin_memory=device.type == "cuda"))
    dummy = dummy_sample(ct)
    n_train = sum(p.numel() for p in params)
    print0(f"{len(ds)} samples ({ds.n_bad} bad) | world {world} x {accum} micro-batches = global batch {G} | "
           f"{num_steps} steps ({num_steps * G / len(ds):.2f} epochs) | lr {args.lr} | "
           f"{n_train / 1e6:.2f}M trainable params | activation checkpointing {args.activation_checkpointing}")

    # ---- logging
    log = None
    if rank == 0 and not args.bench:
        os.makedirs(args.out_dir, exist_ok=True)
        for d in os.listdir(args.out_dir):  # debris of saves killed before their rename
            if d.startswith(".tmp-step_"):
                shutil.rmtree(os.path.join(args.out_dir, d), ignore_errors=True)
        lines = []
        log_path = os.path.join(args.out_dir, "log.jsonl")
        if meta is not None and os.path.exists(log_path):  # drop lines past the checkpoint: they are redone
            with open(log_path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
        log = open(log_path, "w")
        log.writelines(lines)
        log.flush()
    bar = tqdm(total=end_step, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    bench_tokens, bench_time = 0, 0.0

    # ---- the loop
    step = start_step
    loss = None
    while True:
        last_step = step == end_step
        periodic = args.save_every > 0 and step % args.save_every == 0
        if not args.bench and step > start_step and (last_step or periodic):
            run_meta = dict(step=step, data_position=step * G, epoch=step * G / len(ds), num_steps=num_steps,
                            world_size=world, loss=loss, args=vars(args), config=config_to_hf(cfg),
                            init_from=init_from)
            path = save(args.out_dir, step, model, opt, cfg, (ct.tok, ct.qtok), run_meta, model_dir, rank)
            if rank == 0:
                bar.write(f"step {step}: saved {path}")
        if last_step:
            break

        t0 = time.perf_counter()
        micro = [next(loader) for _ in range(accum)]
        # The loss is the mean NLL over the supervised tokens of the whole GLOBAL batch: count them
        # first, then divide each micro-batch's summed NLL by that count. With gradients summed
        # over ranks (divide factor 1) this is the same gradient for any world size / accumulation.
        counts = torch.tensor([sum(n_supervised(s) for s in micro), sum(len(s.get("input_ids", ())) for s in micro),
                               sum("skip" in s for s in micro)], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        n_tok = max(1.0, counts[0].item())
        lr = lr_at(step, num_steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        nll_total = torch.zeros((), dtype=torch.float64, device=device)
        for s in micro:
            nll = sample_nll(model, dummy if "skip" in s else s, device)
            (nll / n_tok).backward()
            nll_total += nll.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        gnorm = (gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm).item()
        if counts[0] > 0:
            opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(nll_total)
        loss = nll_total.item() / n_tok
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1

        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**30
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, peak RSS
        rec = dict(step=step, loss=loss, lr=lr, grad_norm=gnorm, tokens=int(counts[1]), supervised=int(counts[0]),
                   skipped=int(counts[2]), tok_per_s=counts[1].item() / dt, step_s=dt, mem_gib=mem)
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gn=f"{gnorm:.2f}", tok_s=f"{rec['tok_per_s']:.0f}")
        if rank == 0 and (step % 10 == 0 or step == 1):
            bar.write(f"step {step:5d}/{num_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {gnorm:.3f} | "
                      f"{rec['tok_per_s']:.0f} tok/s | mem {mem:.2f} GiB")
        if args.bench and step > start_step + 2:
            bench_tokens, bench_time = bench_tokens + counts[1].item(), bench_time + dt
    bar.close()
    if log is not None:
        log.close()
    if args.bench and bench_time > 0:
        n = step - start_step - 2
        print0(f"bench: {bench_tokens / bench_time:.0f} tokens/s over {world} rank(s) "
               f"({bench_tokens / bench_time / world:.0f} per rank), {bench_time / n:.2f} s/step over {n} steps, "
               f"global batch {G}, device {device.type}")


if __name__ == "__main__":
    main()
