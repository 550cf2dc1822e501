"""
"Will it fit?" measured on a CPU: the peak memory per GPU of one SFT or GRPO step of the real
configuration at world size N, on fake tensors (`python bench.py plan sft|grpo`).

One CPU process plays rank 0 of a world of N through a fake process group (every collective
returns at once) and runs the step through the functions the scripts run: training.sharded_model
(the FSDP2 units, bf16 mixed precision, activation checkpointing), training.make_optimizer
(AdamW), training.rank_micro_batches, sft.batch_nll, grpo.batch_logprobs / update / unsharded,
and, for the GRPO rollout, the model calls rollout.rollout makes. The flags are the scripts' own
defaults (the paper's setting), read from sft.parse_args / grpo.parse_args. Tensors are fake
(shapes and dtypes, no storage), so a 7B step costs a minute of CPU and no memory.
torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker counts the bytes of every tensor alive
by kind (sharded parameters, gradients, optimizer state, gathered weights, activations, ...) and
keeps the breakdown at the peak. The same code runs on real tensors (`--real`, under torchrun),
which is how tests/test_plan.py checks the prediction against a real step.

This is its own module, not part of bench.py, because it is tooling around fake tensors and a
private torch tracker, with workarounds that have nothing to do with training:

1. Integer tensors carry their values (ValueMode). The model reads index tensors on the host:
   grid_thw.tolist() in the vision layout, rope_index's image runs, the count of <|image_pad|>
   tokens; so does init_device_mesh inside fully_shard (its rank list). On plain fake tensors
   each read raises DataDependentOutputException (the error fully_shard hit). Here an integer or
   bool tensor whose inputs are known is computed for real (ids, grids, positions, masks: small),
   while float tensors stay fake. Reading an unknown value on the host (a logged loss, a clip
   count, the gradient norm) gives 0: the step's shapes come from known integers only (the fake
   and real steps of tests/test_plan.py agree).
2. The root unit's training forward is `hidden_states`, which FSDP enters through
   register_fsdp_forward_method, past the module hooks the tracker wraps; the tracked learner
   phase routes it through the module's __call__ (hidden_states_as_forward).
3. The tracker refuses a second forward of the root in one tracked "iteration" (Tracker: every
   root forward starts its per-module statistics afresh; the peak is kept), and counts only
   tensors it sees made, so the rollout's gathered weights and KV cache, made before, are
   registered by hand (track_as).
4. DTensor's sharding propagation builds global-shape fake tensors in the *active* fake mode,
   which the tracker counts as allocations: without the warm-up step (whose propagation is
   cached), clip_grad_norm_'s foreach norm showed 33 GiB of phantom full-size gradients at 7B.
   Propagation gets a fake mode of its own, as in a real run.
5. The learner encodes a group that repeats in a micro-batch once (data.unique_groups), which
   compares pixels; fake pixels have no values, so the plan encodes every trajectory's images
   for it, as if no two rollouts in a micro-batch shared their originals: an upper bound.

The fake tensors live on "cpu": in a CPU build a "cuda" fake tensor cannot consult the CUDA
kernels' constraints, so SDPA decomposes into the math path (T x T scores), while on "cpu" it takes
the flash kernel, whose memory (output + log-sum-exp) is that of flash attention on an H100/H20.
Mixed precision is set as on a GPU. Not seen: the CUDA caching allocator's fragmentation and
reserved-but-free blocks, NCCL buffers, the CUDA context and kernel workspaces.
"""

import argparse
import contextlib
import time
import types
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed.tensor._sharding_prop as sharding_prop
import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.utils._mode_utils import no_dispatch

import data
import grpo
import rollout
import sft
from data import Context
from model import rope_index
from training import make_optimizer, rank_micro_batches, sharded_model

GiB = 2**30
TEXT = 1  # the token id of every text token of a planned sample (values do not change memory)

# -----------------------------------------------------------------------------
# fake floats, real integers


VALUE_LIMIT = 1 << 24  # elements: a tensor with known inputs up to this size is computed for real


class ValueMode(FakeTensorMode):
    """FakeTensorMode in which a tensor computed from known tensors is known too (a fake tensor
    with a `constant`), up to VALUE_LIMIT elements; factory calls that make integer or bool
    tensors (torch.arange, torch.full of ids) are known. Fake tensors keep constants only up to
    one element; this is what lets the model's host-side bookkeeping run (module docstring)."""

    def may_turn_const(self, t):
        return t.numel() <= VALUE_LIMIT and not self.is_our_fake(t) and t.device.type == "cpu" and not t.is_sparse

    def _dispatch_impl(self, func, types, args, kwargs):
        out = super()._dispatch_impl(func, types, args, kwargs)
        if (isinstance(out, torch.Tensor) and self.is_our_fake(out) and out.constant is None
                and not out.is_floating_point() and out.numel() <= VALUE_LIMIT and out.device.type == "cpu"
                and not any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs)))
                and torch.Tag.nondeterministic_seeded not in func.tags):
            with no_dispatch():  # a factory of ids or positions: make it for real
                real = func(*args, **kwargs)
            return self.fake_tensor_converter.from_real_tensor(self, real, make_constant=True)
        return out

    def dispatch(self, func, types, args=(), kwargs=None):
        t = args[0] if args else None
        if func is torch.ops.aten._local_scalar_dense.default and self.is_our_fake(t) and t.constant is None:
            return 0.0 if t.is_floating_point() else 0  # an unknown statistic read on the host (a loss, a clip count)
        return super().dispatch(func, types, args, kwargs or {})


@contextlib.contextmanager
def fake_world(world):
    """Rank 0 of a fake process group of `world` ranks, under ValueMode."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    # DTensor's sharding propagation takes the active fake mode if there is one; give it its own
    # (as in a real run), or the tracker counts its global-shape temporaries (workaround 4)
    try:
        with ValueMode(), mock.patch.object(sharding_prop, "detect_fake_mode", lambda *a, **k: None):
            yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def hidden_states_as_forward(model):
    """The training forward (hidden_states) entered through module __call__, so that the
    tracker's wrappers of the root unit's pre/post-forward see it (workaround 2)."""
    wrapped = model.hidden_states
    model.forward = types.MethodType(type(model).hidden_states, model)
    model.hidden_states = model.__call__
    try:
        yield
    finally:
        del model.forward
        model.hidden_states = wrapped


def track_as(tracker, tensors, kind):
    """Tensors made before the tracker started (the gathered weights of the rollout, the KV
    cache), counted from its first operation under `kind`."""
    for t in tensors:
        tracker._update_and_maybe_create_winfos(t, kind)


# -----------------------------------------------------------------------------
# what a step reads: samples and trajectories of a given size


def image_block(cfg, grid):
    return [TEXT] + [cfg.lm.image_token_id] * (grid[0] * grid[1] // 4) + [TEXT]  # <|vision_start|> pads <|vision_end|>


def encoder_inputs(originals, crops, inquiry):
    """pixel_values, grids and groups as data.Context.encoder_inputs gives them: each original its
    own group with no inquiry, the crops of one tool call one group with an `inquiry`-token query."""
    grids = originals + crops
    q_len = torch.tensor([0] * len(originals) + [inquiry] * bool(crops))
    q_mask = (torch.arange(max(1, inquiry))[None] < q_len[:, None]).long()
    return dict(pixel_values=torch.zeros(sum(h * w for h, w in grids), 1176),
                grid_thw=torch.tensor([[1, h, w] for h, w in grids]),
                image_to_query=torch.tensor(list(range(len(originals))) + [len(originals)] * len(crops)),
                query_ids=q_mask * TEXT, query_mask=q_mask)


def prompt_ids(cfg, spec):
    """A prompt: its text (Figures 15/16 and the question), then the originals, then the
    assistant header's last token (text, as rollout.rollout holds it back)."""
    return [TEXT] * spec.prompt_tokens + sum((image_block(cfg, g) for g in spec.originals), []) + [TEXT]


def sample_ids(cfg, spec):
    """spec.seq_len token ids: the prompt, policy text, the crops of one tool call (an
    observation), policy text. Returns (ids, policy mask: 1 on the two policy stretches)."""
    head, obs = prompt_ids(cfg, spec), sum((image_block(cfg, g) for g in spec.crops), [])
    n = spec.seq_len - len(head) - len(obs)
    assert n >= 2, f"--seq-len {spec.seq_len} leaves no room for text beside {len(head) + len(obs)} prompt/image tokens"
    ids = head + [TEXT] * (n // 2) + obs + [TEXT] * (n - n // 2)
    mask = [0] * len(head) + [1] * (n // 2) + [0] * len(obs) + [1] * (n - n // 2)
    return ids, mask


def sft_sample(cfg, spec):
    """One SFT sample (sft.SAMPLE_KEYS), the assistant's turns supervised."""
    ids, mask = sample_ids(cfg, spec)
    ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
    return dict(input_ids=ids, labels=ids.masked_fill(~mask, -100), **encoder_inputs(spec.originals, spec.crops,
                                                                                     spec.inquiry))


def trajectory(cfg, spec):
    """One GRPO update item (grpo.learner_batch's layout): ids, encoder inputs, policy mask, advantage."""
    ids, mask = sample_ids(cfg, spec)
    return dict(ids=ids, enc=encoder_inputs(spec.originals, spec.crops, spec.inquiry),
                mask=torch.tensor(mask[1:], dtype=torch.float32), adv=torch.tensor(1.0))


def small(spec):
    """A short sample of the same kind, for the warm-up step that creates the optimizer state."""
    return argparse.Namespace(**dict(vars(spec), seq_len=256, originals=[(8, 8)], crops=[(8, 8)], prompt_tokens=16))


# -----------------------------------------------------------------------------
# the phases of a step, each under its own tracker


class Tracker(FSDPMemTracker):
    """FSDPMemTracker over several forwards (micro-batches, old log-probs then update, prefill
    then decode). It keeps per-module statistics for one forward and refuses a second forward of
    the root; we read only the peak, so every forward of the root starts them afresh. It also
    notes where the peak was: `peak_at`, e.g. "backward of model.layers.26.mlp"."""

    peak_at = ""

    def _update_peak_stats(self, peak_state):
        before = dict(self._peak_mem)
        super()._update_peak_stats(peak_state)
        if self._peak_mem != before:
            inner, bw = max(self._mod_tracker.parents, key=len), self._mod_tracker.is_bw  # the innermost module
            self.peak_at = ("optimizer step" if self._in_opt else
                            f"{'backward' if bw else 'forward'}, outside the modules" if inner == "Global" else
                            f"{'backward' if bw else 'forward'} of {inner.removeprefix('FSDPViLaVT.').removeprefix('FSDP')}")

    def _fsdp_state_pre_forward(self, fsdp_mod, orig):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)
        if fsdp_mod is not self._root_mod:
            return inner

        def root_pre_forward(*args, **kwargs):
            if not self._mod_tracker.is_bw:
                self.reset_mod_stats()
            return inner(*args, **kwargs)
        return root_pre_forward


def breakdown(tracker, device):
    """The tracker's peak snapshot on `device` (cpu tensors of a GPU run are host memory):
    {category name: bytes, "Total": bytes, "at": where}."""
    snap = next((v for d, v in tracker.get_tracker_snapshot("peak").items() if d.type == torch.device(device).type), {})
    return {**{(k.value if isinstance(k, _FSDPRefType) else k): v for k, v in snap.items()}, "at": tracker.peak_at}


def sft_learner(model, opt, cfg, spec, args, device, tracker=None):
    """sft.py's step for one rank: spec.micro_batches samples (gradient accumulation; the third
    and later repeat the second's memory) in micro-batches of --micro-batch-tokens, clipping, AdamW."""
    s = sft_sample(cfg, spec)
    if tracker is not None:
        tracker.track_inputs(s)
    for items in rank_micro_batches([s] * spec.micro_batches, args.micro_batch_tokens, device, key="input_ids"):
        sft.batch_nll(model, items, device).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def grpo_learner(model, opt, cfg, spec, args, device, tracker=None):
    """grpo.py's steps 5-6 for one rank: old log-probs (in their own pass only where the update
    takes several optimizer steps, grpo.fused_old), then the Eq. 6 update (clip, AdamW), on
    spec.micro_batches trajectories of spec.seq_len tokens, one micro-batch each."""
    batch = [trajectory(cfg, spec) for _ in range(spec.micro_batches)]
    if tracker is not None:
        tracker.track_inputs([t["enc"] for t in batch])
    with mock.patch.object(data, "unique_groups", lambda enc: enc):  # workaround 5
        if not grpo.fused_old(args):
            grpo.old_logprobs(model, batch, device, args.micro_batch_tokens, args.temperature)
        grpo.update(model, opt, [p for p in model.parameters() if p.requires_grad], batch, args, device)


def learner(kind, model, opt, cfg, spec, args, device):
    """The learner phase of one step under its own tracker, after a short untracked step that
    creates the AdamW state (as step 1 of a run does)."""
    step = sft_learner if kind == "sft" else grpo_learner
    with hidden_states_as_forward(model):
        step(model, opt, cfg, small(spec), args, device)
        tracker = Tracker(model, opt)
        with tracker:
            step(model, opt, cfg, spec, args, device, tracker)
    return breakdown(tracker, device)


def rollout_phase(model, opt, cfg, spec, args, world, device):
    """grpo.py's step 1 for one rank at the limits, on the gathered weights, mirroring the model
    calls of rollout.rollout: (a) every prompt prefilled once into rows 0..P-1 and copied to its
    G rows; (b) the cache grown to --max-context for every row, one observation (the crops of
    one tool call and their inquiry) prefilled into one row as late as it fits, one decode step of
    all rows reading every slot. Two trackers: {"rollout prefill": ..., "rollout at the limit": ...}."""
    P, G = args.prompts_per_step // world, args.group_size
    ids = prompt_ids(cfg, spec)
    L, n, out = len(ids) - 1, P * G, {}
    model.eval()
    grpo.unsharded(model, True)
    weights = list(model.parameters())  # now the gathered (bf16) ones
    cache = model.new_cache(n, min(args.max_context, L + 1 + rollout.CACHE_CHUNK))  # the rollout's first cache
    kv = lambda: [t for c in cache.layers for t in (c.k, c.v)]  # noqa: E731

    def tracker():
        tr = Tracker(model, opt)
        track_as(tr, weights, _FSDPRefType.UNSHARDED_PARAM)
        tr.track_inputs(kv())  # "Inputs" of the rollout phase = the KV cache
        return tr

    with (tr := tracker()), torch.no_grad():
        enc = rollout._on_device(model, Context.merge_encoder_inputs(
            [encoder_inputs(spec.originals, [], 0) for _ in range(P)]), device)
        batch_ids = torch.tensor([ids[:-1]] * P)
        pos, _ = rope_index(batch_ids, enc["grid_thw"].cpu(), cfg.lm.image_token_id)
        model.hidden_states(batch_ids.to(device), **enc, position_ids=pos.to(device), cache=cache.view_rows(0, P),
                            cache_pos=torch.zeros(P, dtype=torch.long, device=device))
        del enc
        for b in reversed(range(P)):
            cache.copy_rows([b] * G, list(range(b * G, b * G + G)), n=L)
    out["rollout prefill"] = breakdown(tr, device)

    with (tr := tracker()), torch.no_grad():
        cache.grow(args.max_context, n=L)
        tr.track_inputs(kv())  # the grown cache is the cache again
        obs = sum((image_block(cfg, g) for g in spec.crops), []) + [TEXT] * 64  # + the observation's text
        at = args.max_context - len(obs) - 2
        enc = rollout._on_device(model, encoder_inputs([], spec.crops, spec.inquiry), device)
        pos, _ = rollout._positions(obs, enc["grid_thw"].cpu(), at, cfg.lm.image_token_id)
        model.hidden_states(torch.tensor([obs], device=device), **enc, position_ids=pos.to(device),
                            cache=cache.view_rows(0, 1), cache_pos=torch.tensor([at], device=device))
        del enc
        last = args.max_context - 1
        logits = model(torch.full((n, 1), TEXT, device=device), position_ids=torch.full((3, n, 1), last, device=device),
                       cache=cache, cache_pos=torch.full((n,), last, device=device))[:, -1].float()
        banned = torch.tensor([cfg.lm.image_token_id], device=device)
        gens = [torch.Generator(device=device).manual_seed(g) for g in range(n)]
        sampling = rollout.Sampling(args.temperature, args.top_p)
        rollout.sample(logits.index_fill(-1, banned, float("-inf")), sampling, gens)
        del logits
    out["rollout at the limit"] = breakdown(tr, device)
    grpo.unsharded(model, False)
    model.train()
    return out


# -----------------------------------------------------------------------------
# the plan


def run(kind, cfg, args, spec, world, device="cpu", mixed_precision=True, real=False):
    """One step's peak memory on rank 0 of `world`: ({phase: {tracker category: bytes, "Total"}},
    parameter count). Fake (default): in this process, on a fake process group. real=True: on
    real tensors, random weights, in the process group already set up (torchrun)."""
    with contextlib.nullcontext() if real else fake_world(world):
        model = sharded_model(cfg, args, mixed_precision)
        model.to_empty(device=device)
        if real:
            torch.manual_seed(0)
            model.init_weights()
        model.train()
        opt = make_optimizer(model, args)
        n_params = sum(p.numel() for p in model.parameters())  # DTensors: global sizes
        if kind == "sft":
            return {"learner": learner(kind, model, opt, cfg, spec, args, device)}, n_params
        # the learner's warm-up step first (the rollout runs with the AdamW state of earlier steps)
        out = {"learner": learner(kind, model, opt, cfg, spec, args, device)}
        return {**rollout_phase(model, opt, cfg, spec, args, world, device), **out}, n_params


ROWS = [  # (line of the table, the tracker's categories)
    ("parameters (fp32 shards)", ("Sharded Param",)),
    ("gradients (fp32 shards; unsharded until reduce-scattered)", ("Sharded Grad", "Unsharded Grad")),
    ("optimizer state (AdamW moments)", ("OptState",)),
    ("gathered weights (unsharded units, bf16)", ("Unsharded Param",)),
    ("all-gather / reduce-scatter buffers", ("All Gather", "Reduce Scatter")),
    ("activations and temporaries", ("Activation", "Temp", "Buffer")),
    ("inputs (learner: the samples; rollout: the KV cache)", ("Inputs",)),
]


def table(result):
    """Markdown table: one column per phase, GiB (MiB below 1 GiB) per GPU."""
    phases = list(result)
    unit, scale = ("GiB", GiB) if peak(result) >= GiB else ("MiB", 2**20)
    lines = [f"| per GPU, {unit} | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
    for label, cats in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{sum(result[p].get(c, 0) for c in cats) / scale:.1f}"
                                                   for p in phases) + " |")
    lines.append("| **peak** | " + " | ".join(f"**{result[p].get('Total', 0) / scale:.1f}**" for p in phases) + " |")
    lines.append("| peak at | " + " | ".join(result[p]["at"] for p in phases) + " |")
    return "\n".join(lines)


def peak(result):
    return max(r.get("Total", 0) for r in result.values())


CAPACITY = (("H100", 80), ("H20", 96))  # nominal memory, GiB (what a program can allocate is a little less)


def report(kind, cfg, args, spec, world, result, n_params, seconds, real):
    """The printed plan: what ran, the table, the fit on CAPACITY, the last line."""
    vis = lambda gs: sum(h * w // 4 for h, w in gs)  # noqa: E731
    grids = lambda gs: ", ".join(f"{h}x{w}" for h, w in gs) or "none"  # noqa: E731
    lines = [f"plan {kind}: world {world}, {n_params / 1e9:.2f} B parameters, FSDP2, "
             f"{'bf16 compute / fp32 master weights' if args.mixed_precision else 'fp32'}, activation checkpointing "
             f"{'on' if args.activation_checkpointing else 'off'}, "
             f"vision {'frozen' if args.freeze_vision else 'trained'}; "
             f"{'real' if real else 'fake'} tensors, {seconds:.0f} s, {torch.get_num_threads()} thread(s)",
             f"sample: {spec.seq_len:,} tokens: {spec.prompt_tokens} prompt text, originals of {vis(spec.originals):,} "
             f"visual tokens ({grids(spec.originals)} patches), one tool call's crops of {vis(spec.crops):,} "
             f"({grids(spec.crops)}) with a {spec.inquiry}-token inquiry, the rest policy text; "
             f"{spec.micro_batches} micro-batches, then clip + AdamW step"]
    if kind == "grpo":
        P, G = args.prompts_per_step // world, args.group_size
        lm = cfg.lm
        slot = 2 * lm.num_hidden_layers * lm.num_key_value_heads * (lm.hidden_size // lm.num_attention_heads) * 2
        lines.append(f"rollout: {args.prompts_per_step} prompts x {G} over {world} ranks: {P} prompts, {P * G} rows "
                     f"here, each prompt {len(prompt_ids(cfg, spec)):,} tokens; KV cache at --max-context "
                     f"{args.max_context:,}: {P * G} x {args.max_context:,} slots x {slot:,} B = "
                     f"{P * G * args.max_context * slot / GiB:.1f} GiB")
    top = peak(result) / GiB
    lines += ["", table(result), "",
              "fits: " + ", ".join(f"{name} ({gib} GiB): " + (f"yes, {gib - top:.1f} GiB left" if top < gib else
                                                              f"NO, {top - gib:.1f} GiB over") for name, gib in CAPACITY)
              + " (before allocator fragmentation, NCCL buffers and the CUDA context)",
              f"peak per GPU: {top:.1f} GiB"]
    return "\n".join(lines)


def plan(kind, cfg, world, spec, flags=(), device="cpu", mixed_precision=True, real=False):
    """The script's flags (`flags` on top of its defaults), one step measured; (report, result)."""
    args = (sft if kind == "sft" else grpo).parse_args(["--model", "-", "--data", "-", *flags])
    args.mixed_precision = mixed_precision
    if spec.seq_len is None:
        spec = argparse.Namespace(**dict(vars(spec), seq_len=args.max_length if kind == "sft" else args.max_context))
    if kind == "grpo" and args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not a multiple of --world-size {world}")
    t0 = time.perf_counter()
    result, n_params = run(kind, cfg, args, spec, world, device, mixed_precision, real)
    return report(kind, cfg, args, spec, world, result, n_params, time.perf_counter() - t0, real), result
