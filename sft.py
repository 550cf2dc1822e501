"""
Supervised fine-tuning of ViLaVT (paper Eq. 4): maximum likelihood of the assistant's tokens of
gold "chatting with images" trajectories; crops are cut on the fly by the crop rule (data.py).

    torchrun --nproc_per_node 8 sft.py --model Qwen2.5-VL-7B-Instruct --embedder Qwen3-Embedding-0.6B \
        --data train.jsonl --image-root images/
    torchrun --nproc_per_node 8 sft.py --model ViLaVT-ckpt --data ViLaVT-Data/sft.json \
        --image-root ViLaVT-Data/ --import-release          # the authors' released records
    ... same command + --resume                             # continue out_dir/latest exactly
    ... same command + --bench                              # tokens/s of this config, writes nothing

Multi-node: torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint ...); the out dir must be
on a filesystem all nodes share. Distributed layout (training.py): FSDP2 (`fully_shard`) on every
decoder block, every vision block, then the root; bf16 compute with fp32 master weights and fp32
gradient reduction on GPU, plain fp32 on CPU (gloo). Micro-batches (--micro-batch-tokens N): this
rank's samples of a step sorted by length and cut into right-padded micro-batches of at most N
padded tokens (rows x longest row; training.micro_batches cuts where the padding saved pays for a
forward), a longer sample alone (no packing; N = 0: one sample each, as
the release), one vision-encoder call and one LM forward each; gradient accumulation up to
--global-batch. The loss is the token-weighted mean over the whole global batch, so any world
size, accumulation split and micro-batch size gives the same gradient. Checkpoints, --resume and
log.jsonl (loss, lr, grad_norm, tokens/s, memory per step): see training.py.
"""

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import release
import data
from data import ENCODER_KEYS, Budget, ChatTokenizer, TrajectoryDataset
from model import config_to_hf
from training import (build_model, distributed, lr_at, make_optimizer, open_log, padded, padded_forward, print0,
                      rank_micro_batches, resolve_checkpoint, restore, save, start_point, warn)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data-loader workers fork after the tokenizers ran

# -----------------------------------------------------------------------------
# CLI (defaults: the paper's 7B run, section 4.1 and App. C)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ViLaVT SFT (paper Eq. 4)")
    a = ap.add_argument
    # model and data
    a("--model", required=True, help="stock Qwen2.5-VL folder (with --embedder) or a ViLaVT checkpoint folder "
                                     "(or a run's `latest`)")
    a("--embedder", help="Qwen3-Embedding folder: builds ViLaVT from a stock Qwen2.5-VL --model")
    a("--data", required=True, help="training JSONL, our schema (README)")
    a("--image-root", help="folder the records' image paths are relative to (default: --data's folder)")
    a("--import-release", action="store_true",
      help="--data is the authors' released SFT file (JSON list or JSONL of {images, conversations, queries, "
           "image_to_query_mapping}): converted to out_dir/imported.jsonl, pre-made crop files kept")
    a("--skip-bad", action="store_true", help="skip (and log) bad records instead of stopping")
    data.Initial.add_args(ap)
    a("--out-dir", default="out/sft", help="checkpoints and log.jsonl (default: out/sft)")
    a("--resume", action="store_true", help="continue out_dir/latest exactly (starts fresh if there is none)")
    # optimisation
    a("--epochs", type=int, default=2, help="default: 2 (paper; the release ran 3)")
    a("--max-steps", type=int, default=-1, help="schedule length in optimizer steps (default: from --epochs)")
    a("--stop-at-step", type=int, default=-1,
      help="save and stop after this step, as if the job were killed; the schedule is unchanged")
    a("--global-batch", type=int, default=384, help="samples per optimizer step over all ranks (default: 384, "
                                                    "paper and release)")
    a("--micro-batch-tokens", type=int, default=4096,
      help="samples per forward by padded tokens (rows x longest row): this rank's samples of a step grouped "
           "by length, a longer sample alone; the same gradient for any N. Default: 4096 (1.2x the tokens/s "
           "of 0 for samples of a few hundred tokens on CPU; at 7B only samples under 2,048 tokens share a "
           "forward, so memory stays that of one --max-length sample); 0: one sample per forward, the release's "
           "behaviour")
    a("--lr", type=float, default=1e-5, help="peak AdamW lr (default: 1e-5, paper sec. 4.1; the release script "
                                             "and the paper's App. C used 5e-5)")
    a("--vision-lr", type=float, help="peak lr of the vision tower (default: --lr); the schedule is --lr's, scaled")
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
    a("--total-visual-tokens", type=int, default=8192, help="per-sample budget (default: 8192)")
    a("--crop-max-pixels", type=int, default=0, help="max pixels per crop; 0: the whole --total-visual-tokens "
                                                     "budget (SPEC 3, as at inference). A record's own max_pixels "
                                                     "caps its crops too (the release's SFT: 200704 for every image)")
    # what trains (SPEC 2): the inquiry text encoder is always frozen
    a("--train-text-proj", action="store_true", help="train text_proj (the release froze it during SFT)")
    a("--freeze-vision", action="store_true", help="freeze the whole ViT, instruct projections included")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
      help="recompute decoder and vision blocks in backward (default: on, as the release)")
    # io
    a("--save-every", type=int, default=100, help="checkpoint every N steps (0: never) and at the end (default: 100)")
    a("--num-workers", type=int, help="data-loading processes (default: 4 on GPU, 0 on CPU)")
    a("--bench", action="store_true", help="time a few steps of this config, print tokens/s, write nothing")
    return ap.parse_args(argv)


# Flags that must not change across --resume (they define the run's math and data order).
RESUME_KEYS = ("data", "image_root", "import_release", "epochs", "max_steps", "global_batch", "lr", "warmup",
               "weight_decay", "grad_clip", "seed", "max_length", "max_pixels", "crop_max_pixels", "min_pixels",
               "total_visual_tokens", "train_text_proj", "freeze_vision", "skip_bad", "vision_lr",
               "initial_groups", "initial_inquiry")

# -----------------------------------------------------------------------------
# Data: a seeded permutation per epoch; global position p -> (epoch p // N, sample perm_epoch[p % N])

SAMPLE_KEYS = ("input_ids", "labels") + ENCODER_KEYS


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
    """Stands in for a skipped sample: every rank must run the same forwards/backwards (FSDP
    collectives), and this one has no supervised token, so it adds exactly zero gradient."""
    ids = torch.tensor(ct.image_block(1))
    qids, qmask = ct.queries([""])
    return dict(input_ids=ids, labels=torch.full_like(ids, -100), pixel_values=torch.zeros(4, 1176),
                grid_thw=torch.tensor([[1, 2, 2]]), image_to_query=torch.tensor([0]), query_ids=qids, query_mask=qmask)


def batch_nll(model, samples, device):
    """Summed NLL of the supervised tokens (targets = labels shifted left) of a micro-batch of
    samples, in one padded forward (training.padded_forward; labels -100 at the padding). The
    lm_head runs at the supervised positions only (chunked token_logprobs), never
    on the full fp32 (T x vocab) logits."""
    encs = [{k: s[k] for k in ENCODER_KEYS} for s in samples]
    ids, h = padded_forward(model, [s["input_ids"] for s in samples], encs, device)
    targets = F.pad(padded(samples, "labels", ids.shape[1], device, -100)[:, 1:], (0, 1), value=-100)
    pick = targets != -100
    if not pick.any():  # dummies only: a zero loss that still runs the backward (FSDP collectives)
        return -model.token_logprobs(h[:, :1], targets[:, :1]).sum()
    return -model.token_logprobs(h[pick][None], targets[pick][None]).sum()


def n_supervised(s):
    return 0 if "skip" in s else int((s["labels"][1:] != -100).sum())


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    with distributed() as (rank, world, device):
        train(args, rank, world, device)


def train(args, rank, world, device):
    batch = args.global_batch  # samples per optimizer step, all ranks
    if batch % world:
        raise SystemExit(f"--global-batch {batch} is not a multiple of the world size {world}")
    accum = batch // world  # samples per rank per step (micro-batches of --micro-batch-tokens each)

    # ---- where the model and the data come from
    model_dir, embedder_dir = resolve_checkpoint(args.model), args.embedder
    # a record's own max_pixels (e.g. the zoom world's display size) wins over --max-pixels
    budget = Budget(total_tokens=args.total_visual_tokens, max_pixels=args.max_pixels or None,
                    crop_max_pixels=args.crop_max_pixels or None, min_pixels=args.min_pixels)
    args.image_root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    ckpt, meta, init_from = start_point(args, RESUME_KEYS, model_dir)
    if ckpt is not None:
        model_dir, embedder_dir = ckpt, None  # the checkpoint is self-contained
    if args.import_release:
        imported = os.path.join(args.out_dir, "imported.jsonl")
        if rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            n_ok, n_bad = release.import_release(args.data, imported, args.skip_bad, log=warn)
            print0(f"imported {n_ok} release records from {args.data} ({n_bad} skipped) -> {imported}")
        dist.barrier()
        data_path = imported
    else:
        data_path = args.data

    # ---- model, tokenizers, data, optimizer
    model, cfg = build_model(model_dir, embedder_dir, args, device, rank)
    ct = ChatTokenizer.load(model_dir, cfg, embedder_dir)
    ds = TrajectoryDataset(data_path, args.image_root, ct, budget, skip_bad=args.skip_bad, log=warn,
                           initial=data.Initial.from_args(args))
    num_steps = args.max_steps if args.max_steps > 0 else args.epochs * len(ds) // batch
    if num_steps < 1:
        raise SystemExit(f"{len(ds)} samples x {args.epochs} epochs is less than one global batch of {batch}")
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
    # rank r's sample j of step s is global position s*batch + j*world + r
    positions = [s * batch + j * world + rank for s in range(start_step, end_step) for j in range(accum)]
    loader = iter(torch.utils.data.DataLoader(Stream(ds, args.seed, args.max_length), batch_size=None,
                                              sampler=positions, num_workers=workers,
                                              pin_memory=device.type == "cuda"))
    dummy = dummy_sample(ct)
    n_train = sum(p.numel() for p in params)
    per_forward = f"{args.micro_batch_tokens} padded tokens" if args.micro_batch_tokens else "one sample"
    print0(f"{len(ds)} samples ({ds.n_bad} bad) | world {world} x {accum} samples = global batch {batch} | "
           f"micro-batches of {per_forward} | "
           f"{num_steps} steps ({num_steps * batch / len(ds):.2f} epochs) | lr {args.lr} | "
           f"{n_train / 1e6:.2f}M trainable params | activation checkpointing {args.activation_checkpointing}")

    # ---- logging
    log = open_log(args.out_dir, start_step, meta is not None) if rank == 0 and not args.bench else None
    bar = tqdm(total=end_step, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    bench_tokens, bench_time = 0, 0.0

    # ---- the loop
    step = start_step
    loss = None
    while True:
        last_step = step >= end_step
        periodic = args.save_every > 0 and step % args.save_every == 0
        if not args.bench and step > start_step and (last_step or periodic):
            run_meta = dict(step=step, data_position=step * batch, epoch=step * batch / len(ds), num_steps=num_steps,
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
            g["lr"] = lr * g["lr_scale"]
        nll_total = torch.zeros((), dtype=torch.float64, device=device)
        # as many forwards on every rank (FSDP collectives): a skipped sample's place is the dummy's
        groups = rank_micro_batches([dummy if "skip" in s else s for s in micro], args.micro_batch_tokens, device,
                                    key="input_ids")
        for items in groups:
            nll = batch_nll(model, items, device)
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
                   skipped=int(counts[2]), forwards=len(groups), tok_per_s=counts[1].item() / dt, step_s=dt,
                   mem_gib=mem)
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
               f"global batch {batch}, --micro-batch-tokens {args.micro_batch_tokens}, device {device.type}")


if __name__ == "__main__":
    main()
