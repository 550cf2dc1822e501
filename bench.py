"""
Benchmarks. One subcommand per benchmark, one function per subcommand (cmd_<name>).

    python bench.py model
        CPU, fp32, SDPA: forward+backward time of our ViLaVT (vanilla Qwen2.5-VL config) against
        transformers' Qwen2_5_VLForConditionalGeneration on identical weights (a tiny checkpoint
        written by transformers' save_pretrained, loaded by both) and identical inputs; the whole
        model and the vision tower alone. Checks logits and gradients agree before timing.
        --profile adds a torch.profiler table of one fwd+bwd of each.

    python bench.py model --arch tiny --device cpu
    python bench.py model --arch 7b --device cuda
        Throughput of our model alone (random weights, bf16 by default), built on the meta device:
        (a) one forward of a multimodal prompt (7b default: 4 images of ~800 visual tokens, 4096
            tokens in all), with achieved TFLOP/s from an analytic FLOP count (flops_* below) and
            the % of --peak-tflops (H100 SXM bf16 dense: 989);
        (b) KV-cache decode tokens/s at --batches (default 1,32) after prefilling that prompt,
            with the % of the memory-bandwidth bound: bytes read per step (LM weights + KV cache)
            / step time / --peak-bw (H100 SXM: 3.35 TB/s).
        --arch tiny is model.tiny_config (the CPU-sized ViLaVT) so the path can be checked on CPU.

    python bench.py rollout
        CPU, fp32: generated tokens/s of our batched rollout (rollout.py) against transformers'
        generate on the same tiny checkpoint, prompt token ids and number of new tokens, at
        --batches (default 1, 8, 32) x --new-tokens (default 32, 256). The last line reads
        `rollout speed-up vs generate: min X.XXx, max Y.YYx`.

    python bench.py plan sft|grpo [--world-size 8]
        Will it fit? The peak memory per GPU of one SFT or GRPO step of the real configuration
        (default: the shipped 7B config files) sharded over --world-size GPUs, measured on fake
        tensors in this CPU process (memplan.py): the table of parameters, gradients, optimizer
        state, gathered weights, all-gather buffers, activations and inputs (GRPO: the rollout's
        prefill and its KV cache at --max-context, then the learner), ending with
        `peak per GPU: X.X GiB`. --real runs the same step on real tensors (torchrun).

Only measured numbers are printed; FLOP and byte counts are formulas, stated in the functions.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

from model import ViLaVT, config_from_hf, read_json, rope_index, tiny_config  # noqa: E402

# Special token ids of the tiny vocabularies used here (2000 ids; text tokens are drawn below 1990).
TINY_VOCAB = 2000
TINY_IDS = dict(vision_start=1990, vision_end=1991, image_pad=1992, video_pad=1993, bos=1994, eos=1995)


# -----------------------------------------------------------------------------
# helpers


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Run fn() once; return (seconds, result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def build_inputs(segments, vocab_text, ids, seed=0, device="cpu", dtype=torch.float32):
    """segments: ints (that many random text tokens, ids < vocab_text) or (h, w) patch grids
    (an image block: vision_start, h*w/4 image_pad, vision_end). Returns ids (1, T), pixel rows
    (N, 1176), grid_thw (n_img, 3)."""
    g = torch.Generator().manual_seed(seed)
    toks, grids = [], []
    for s in segments:
        if isinstance(s, int):
            toks += torch.randint(0, vocab_text, (s,), generator=g).tolist()
        else:
            h, w = s
            toks += [ids["vision_start"]] + [ids["image_pad"]] * (h * w // 4) + [ids["vision_end"]]
            grids.append([1, h, w])
    grid = torch.tensor(grids, dtype=torch.long)
    n = sum(h * w for _, h, w in grids)
    pv = torch.randn(n, 1176, generator=g).to(device=device, dtype=dtype)
    return torch.tensor([toks], device=device), pv, grid.to(device)


def parse_images(s):
    """'56x56,48x68' -> [(56, 56), (48, 68)] patch grids (even sides: 2x2 merge)."""
    out = []
    for part in s.split(","):
        h, w = (int(v) for v in part.lower().split("x"))
        assert h % 2 == 0 and w % 2 == 0, f"image grid {part}: sides must be even (2x2 patch merge)"
        out.append((h, w))
    return out


def interleave(images, seq_len):
    """Text / image / text / ... / text with the text spread evenly so the total is seq_len tokens."""
    n_img_tok = sum(h * w // 4 + 2 for h, w in images)
    n_text = seq_len - n_img_tok
    assert n_text >= len(images) + 1, f"--seq-len {seq_len} leaves no room for text next to {n_img_tok} image tokens"
    gaps = len(images) + 1
    text = [n_text // gaps + (1 if i < n_text % gaps else 0) for i in range(gaps)]
    segs = [text[0]]
    for img, t in zip(images, text[1:]):
        segs += [img, t]
    return segs


def fmt_ms(s):
    return f"{s * 1e3:.1f}"


# -----------------------------------------------------------------------------
# analytic FLOP and byte counts (a matmul of (M x K) by (K x N) = 2*M*K*N FLOPs)


def lm_linear_weights(lm):
    """Weights of all matmuls one LM token goes through: per layer q, k, v, o and the SwiGLU
    gate/up/down, plus lm_head. (Biases, norms, rotary and the embedding lookup are not matmuls.)"""
    hd = lm.hidden_size // lm.num_attention_heads
    q, kv = lm.num_attention_heads * hd, lm.num_key_value_heads * hd
    per_layer = lm.hidden_size * (q + 2 * kv) + q * lm.hidden_size + 3 * lm.hidden_size * lm.intermediate_size
    return lm.num_hidden_layers * per_layer + lm.hidden_size * lm.vocab_size


def flops_lm(lm, T):
    """One causal forward over T tokens: 2*W*T for the matmuls (W = lm_linear_weights) plus
    attention, QK^T and PV at 2*D FLOPs per (query, key) pair per head each, counting only the
    T(T+1)/2 causal pairs."""
    hd = lm.hidden_size // lm.num_attention_heads
    pairs = T * (T + 1) // 2
    attn = lm.num_hidden_layers * 4 * lm.num_attention_heads * hd * pairs
    return 2 * lm_linear_weights(lm) * T + attn


def flops_lm_decode_step(lm, B, end):
    """One decode step of B rows, each attending to `end` cache slots (what our cache hands SDPA)."""
    hd = lm.hidden_size // lm.num_attention_heads
    return B * (2 * lm_linear_weights(lm) + lm.num_hidden_layers * 4 * lm.num_attention_heads * hd * end)


def vision_attention_pairs(v, grids, group_all, n_text):
    """Sum over attention segments of Lq*Lk, per layer kind, for single-frame images (t = 1).
    window: 112-px windows = (window/patch/merge)^2 merge units of 4 patches, ragged at the
    right/bottom edges; frame: one image; group: each image alone (no inquiry), or with
    group_all all images plus n_text inquiry keys in one segment."""
    m = v.spatial_merge_size
    win = v.window_size // m // v.patch_size  # window side in merge units
    window = frame = 0
    for h, w in grids:
        lh, lw = h // m, w // m
        for r in range(0, lh, win):
            for c in range(0, lw, win):
                n = min(win, lh - r) * min(win, lw - c) * m * m
                window += n * n
        frame += (h * w) ** 2
    if group_all:
        N = sum(h * w for h, w in grids)
        group = N * (N + n_text)
    else:
        group = frame
    return {"window": window, "frame": frame, "group": group}


def flops_vision(v, grids, group_all=False, n_text=0):
    """Vision tower forward on N patches: patch embed (1176 -> C), per block qkv (C -> 3C), proj
    (C -> C), SwiGLU (3*C*I), non-causal attention 4*C per (query, key) pair; query-aware layers
    add instruct k/v projections (2*C*C) on the n_text inquiry tokens; merger on N/4 tokens
    (4C -> 4C -> out)."""
    C, I = v.hidden_size, v.intermediate_size
    N = sum(h * w for h, w in grids)
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pairs = vision_attention_pairs(v, grids, group_all, n_text)
    f = 2 * N * patch_in * C
    for i in range(v.depth):
        kind = "group" if i in v.query_layers else ("frame" if i in v.fullatt_block_indexes else "window")
        f += 2 * N * (4 * C * C + 3 * C * I) + 4 * C * pairs[kind]
        if kind == "group":
            f += 2 * n_text * 2 * C * C
    M = 4 * C  # merge unit width (2x2 patches)
    f += 2 * (N // 4) * (M * M + M * v.out_hidden_size)
    return f


def flops_inquiry(q, n_rows, L, text_dim_out):
    """Inquiry encoder (Qwen3, causal, run on the padded (n_rows, L) batch) + text_proj on the valid tokens
    (all n_rows*L here, the benchmark's inquiries are unpadded)."""
    hd = q.head_dim
    qd, kv = q.num_attention_heads * hd, q.num_key_value_heads * hd
    W = q.num_hidden_layers * (q.hidden_size * (qd + 2 * kv) + qd * q.hidden_size + 3 * q.hidden_size * q.intermediate_size)
    attn = n_rows * q.num_hidden_layers * 4 * q.num_attention_heads * hd * (L * (L + 1) // 2)
    return 2 * W * n_rows * L + attn + 2 * n_rows * L * q.hidden_size * text_dim_out


def check_counts_against_model(model):
    """The analytic weight counts must equal the model's own matmul weights (catches formula drift)."""
    lm = model.cfg.lm
    ours = sum(mod.weight.numel() for mod in model.model.layers.modules() if isinstance(mod, torch.nn.Linear))
    ours += model.lm_head.weight.numel()
    assert ours == lm_linear_weights(lm), f"LM matmul weights: model {ours} vs formula {lm_linear_weights(lm)}"
    v = model.cfg.vision
    C, I = v.hidden_size, v.intermediate_size
    vis = sum(mod.weight.numel() for name, mod in model.visual.named_modules()
              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d)) and "instruct_" not in name)
    formula = (v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * C + v.depth * (4 * C * C + 3 * C * I)
               + 16 * C * C + 4 * C * v.out_hidden_size)
    assert vis == formula, f"vision matmul weights: model {vis} vs formula {formula}"


# -----------------------------------------------------------------------------
# model: ours vs transformers (CPU, fp32, tiny checkpoint)


def tiny_hf_checkpoint(out_dir, seed, vocab=TINY_VOCAB, ids=TINY_IDS):
    """Write a small Qwen2.5-VL checkpoint with transformers' own save_pretrained."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vision = dict(depth=8, hidden_size=128, intermediate_size=344, num_heads=4, out_hidden_size=256,
                  fullatt_block_indexes=[3, 7], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["image_pad"],
                           video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                           vision_end_token_id=ids["vision_end"], bos_token_id=ids["bos"],
                           eos_token_id=ids["eos"])
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out_dir)


# transformers as the oracle under 4.57 and 5.x (requirements.txt's range): where their Qwen2.5-VL
# is called differently, these pick the same oracle from either (tests/conftest.py uses them too).


def transformers_5():
    import transformers
    return int(transformers.__version__.split(".")[0]) >= 5


def mm_types(ids, image_token_id):
    """transformers' Qwen2.5-VL computes M-RoPE positions only when given mm_token_type_ids from
    5.x on (without them it silently falls back to 1-D positions, the wrong oracle); 4.x has no
    such argument. Keyword arguments for the reference model, for either."""
    return {"mm_token_type_ids": (ids == image_token_id).int()} if transformers_5() else {}


def hf_vision_features(visual, pixel_values, grid_thw):
    """The merged features (one row per LM token) of transformers' Qwen2.5-VL vision tower: 4.x
    returns them as a tensor; 5.x returns a BaseModelOutputWithPooling whose pooler_output holds
    them (its last_hidden_state is the blocks' output before the merger, in window order)."""
    out = visual(pixel_values, grid_thw=grid_thw)
    return out.pooler_output if transformers_5() else out


def grad_diff(ours, hf):
    """Max abs difference of all parameter gradients (HF names mapped to checkpoint names), and
    the largest gradient magnitude for scale."""
    from model import _stock_key
    mine = dict(ours.named_parameters())
    worst, scale, n = 0.0, 0.0, 0
    for name, p in hf.named_parameters():
        q = mine[_stock_key(name)]
        if p.grad is None and q.grad is None:
            continue
        assert p.grad is not None and q.grad is not None, f"{name}: gradient on one side only"
        worst = max(worst, (p.grad - q.grad).abs().max().item())
        scale = max(scale, p.grad.abs().max().item())
        n += 1
    return worst, scale, n


def model_vs_transformers(args):
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU, sdpa; "
          f"warm-up {args.warmup}, median of {args.iters}")
    images = parse_images(args.images)
    with tempfile.TemporaryDirectory() as d:
        tiny_hf_checkpoint(d, args.seed)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32,
                                                                attn_implementation="sdpa")
        ours = ViLaVT.from_pretrained(d)
    impl = (hf.config._attn_implementation, hf.config.vision_config._attn_implementation)
    assert impl == ("sdpa", "sdpa"), f"transformers runs {impl}, not sdpa"
    segs = interleave(images, args.seq_len)
    ids, pv, grid = build_inputs(segs, TINY_IDS["vision_start"], TINY_IDS, seed=args.seed)
    mm = mm_types(ids, TINY_IDS["image_pad"])
    T, N = ids.shape[1], pv.shape[0]
    cfg = ours.cfg
    print(f"config: LM hidden {cfg.lm.hidden_size}, {cfg.lm.num_hidden_layers} layers, {cfg.lm.num_attention_heads} heads "
          f"/ {cfg.lm.num_key_value_heads} kv, vocab {cfg.lm.vocab_size}; vision hidden {cfg.vision.hidden_size}, "
          f"depth {cfg.vision.depth}, full {list(cfg.vision.fullatt_block_indexes)}, {cfg.vision.num_heads} heads")
    print(f"inputs: {T} tokens, {len(images)} images {['%dx%d' % s for s in images]} patches "
          f"= {N} patches -> {N // 4} image tokens")

    g = torch.Generator().manual_seed(args.seed + 1)
    targets = torch.randint(0, cfg.lm.vocab_size, (T,), generator=g)
    probe = torch.randn(N // 4, cfg.vision.out_hidden_size, generator=g)

    # The four measured steps: full model and vision tower, fwd+bwd, same loss on both sides.
    def full_ours():
        loss = F.cross_entropy(ours(ids, pv, grid)[0], targets)
        loss.backward()

    def full_hf():
        loss = F.cross_entropy(hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, use_cache=False, **mm).logits[0],
                               targets)
        loss.backward()

    def vis_ours():
        (ours.visual(pv, grid) * probe).sum().backward()

    def vis_hf():
        (hf_vision_features(hf.model.visual, pv, grid) * probe).sum().backward()

    # --- parity before timing
    ours.eval()
    hf.eval()
    with torch.no_grad():
        lo = ours(ids, pv, grid)
        lh = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, use_cache=False, **mm).logits
        vo, vh = ours.visual(pv, grid), hf_vision_features(hf.model.visual, pv, grid)
    print(f"parity: logits max |diff| {(lo - lh).abs().max().item():.2e} (max |logit| {lh.abs().max().item():.2f}); "
          f"vision output max |diff| {(vo - vh).abs().max().item():.2e} (max |out| {vh.abs().max().item():.2f})")
    assert (lo - lh).abs().max() <= 1e-3 and (vo - vh).abs().max() <= 1e-3, "outputs disagree: not timing"
    ours.train()
    hf.train()
    for a, b in ((full_ours, full_hf), (vis_ours, vis_hf)):
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)
        a()
        b()
        worst, scale, n = grad_diff(ours, hf)
        assert worst <= 1e-3 * max(1.0, scale), "gradients disagree: not timing"
        print(f"parity: {'full  ' if a is full_ours else 'vision'} fwd+bwd grads, {n} tensors: "
              f"max |diff| {worst:.2e} (max |grad| {scale:.2e})")

    # --- timing: alternate ours / transformers every iteration so drift hits both alike
    steps = [("full model", full_ours, full_hf), ("vision tower", vis_ours, vis_hf)]
    times = {(name, side): [] for name, _, _ in steps for side in ("ours", "hf")}
    for it in range(args.warmup + args.iters):
        for name, fo, fh in steps:
            for side, fn in (("ours", fo), ("hf", fh)):
                ours.zero_grad(set_to_none=True)
                hf.zero_grad(set_to_none=True)
                dt, _ = timed(fn, "cpu")
                if it >= args.warmup:
                    times[(name, side)].append(dt)

    print()
    print(f"{'fwd+bwd, ms':14s} {'ours median':>12s} {'hf median':>10s} {'ratio hf/ours':>14s} "
          f"{'ours min':>9s} {'hf min':>8s} {'ratio of mins':>14s}")
    for name, _, _ in steps:
        o, h = times[(name, "ours")], times[(name, "hf")]
        mo, mh = statistics.median(o), statistics.median(h)
        print(f"{name:14s} {fmt_ms(mo):>12s} {fmt_ms(mh):>10s} {mh / mo:14.2f} {fmt_ms(min(o)):>9s} "
              f"{fmt_ms(min(h)):>8s} {min(h) / min(o):14.2f}")
    print("(ratio > 1: ours faster; hf = transformers. A busy machine only adds time, so when the medians "
          "scatter the mins are the steadier figure.)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for label, fn in (("ours full", full_ours), ("transformers full", full_hf),
                          ("ours vision", vis_ours), ("transformers vision", vis_hf)):
            ours.zero_grad(set_to_none=True)
            hf.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n=== profile: {label} (one fwd+bwd), top {args.profile_rows} ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


# -----------------------------------------------------------------------------
# model: throughput of our model (meta-device build, random weights)


def build_random(arch, device, dtype):
    if arch == "7b":
        cfgs = os.path.join(SHARED, "fixtures", "configs")
        d = read_json(os.path.join(cfgs, "qwen2_5_vl_7b_instruct.config.json"))
        emb = read_json(os.path.join(cfgs, "qwen3_embedding_0_6b.config.json"))
        cfg = config_from_hf(d, emb, "qwen2_5_vl_7b_instruct.config.json")
        ids = dict(vision_start=d["vision_start_token_id"], vision_end=d["vision_end_token_id"],
                   image_pad=d["image_token_id"])
        text_vocab = d["bos_token_id"]  # ordinary text ids lie below <|endoftext|>
    else:
        cfg = tiny_config(TINY_VOCAB, TINY_IDS["image_pad"])
        ids, text_vocab = TINY_IDS, TINY_IDS["vision_start"]
    with torch.device("meta"):
        model = ViLaVT(cfg)
    model.to(dtype)  # still on meta: no fp32 copy of the weights ever exists
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.eval(), ids, text_vocab


def model_throughput(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    defaults = {"7b": ("56x56,48x68,64x50,40x80", 4096, "1,32", 32),
                "tiny": ("16x16,12x20,20x12,8x24", 512, "1,4", 8)}[args.arch]
    images = parse_images(args.images or defaults[0])
    seq_len = args.seq_len or defaults[1]
    batches = [int(b) for b in (args.batches or defaults[2]).split(",")]
    n_steps = args.decode_steps or defaults[3]

    t0 = time.perf_counter()
    model, ids_map, text_vocab = build_random(args.arch, device, dtype)
    check_counts_against_model(model)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"arch {args.arch}: {n_params / 1e9:.3f} B params, {args.dtype}, {dev_name}; built in {time.perf_counter() - t0:.1f} s")
    print(f"peaks used for %: {args.peak_tflops:g} TFLOP/s, {args.peak_bw:g} TB/s (flags --peak-tflops / --peak-bw)")

    segs = interleave(images, seq_len)
    ids, pv, grid = build_inputs(segs, text_vocab, ids_map, seed=args.seed, device=device, dtype=dtype)
    T, N = ids.shape[1], pv.shape[0]
    q_ids = q_mask = i2q = None
    n_text = args.query_tokens
    if n_text:
        # ViLaVT re-encoding: all images in one query group with one inquiry of n_text tokens
        assert model.is_vilavt and n_text <= cfg.inquiry.max_tokens, f"--query-tokens must be 1..{cfg.inquiry.max_tokens}"
        q_ids = torch.randint(0, text_vocab, (1, n_text), device=device)
        q_mask = torch.ones_like(q_ids)
        i2q = torch.zeros(len(images), dtype=torch.long, device=device)

    f_vis = flops_vision(cfg.vision, images, group_all=bool(n_text), n_text=n_text)
    if n_text:
        f_vis += flops_inquiry(cfg.inquiry, 1, n_text, cfg.vision.hidden_size)
    f_lm = flops_lm(cfg.lm, T)
    print(f"prompt: {T} tokens, {len(images)} images {['%dx%d' % s for s in images]} patches = {N} patches "
          f"-> {N // 4} image tokens; inquiry tokens {n_text}")
    print(f"analytic forward FLOPs: vision {f_vis / 1e9:.1f} G, LM {f_lm / 1e9:.1f} G "
          f"(of which causal attention {(f_lm - 2 * lm_linear_weights(cfg.lm) * T) / 1e9:.1f} G)")

    # (a) forward: whole model, vision tower alone, LM alone (on precomputed image features)
    def fwd_full():
        return model(ids, pv, grid, q_ids, q_mask, i2q)

    def fwd_vis():
        return model.encode_images(pv, grid, q_ids, q_mask, i2q)

    with torch.inference_mode():
        emb = fwd_vis()

        def fwd_lm():
            return model(ids, grid_thw=grid, image_embeds=emb)

        rows = []
        for name, fn, flops in (("forward (vision+LM)", fwd_full, f_vis + f_lm), ("vision tower", fwd_vis, f_vis),
                                ("LM (+lm_head)", fwd_lm, f_lm)):
            ts = []
            for it in range(args.warmup + args.iters):
                dt, out = timed(fn, device)
                del out
                if it >= args.warmup:
                    ts.append(dt)
            rows.append((name, statistics.median(ts), flops))
        print()
        print(f"(a) {'forward, median of ' + str(args.iters):26s} {'ms':>10s} {'GFLOP':>10s} {'TFLOP/s':>9s} {'% peak':>7s}")
        for name, s, flops in rows:
            tf = flops / s / 1e12
            print(f"    {name:26s} {fmt_ms(s):>10s} {flops / 1e9:10.1f} {tf:9.3g} {100 * tf / args.peak_tflops:6.3g}%")
        if device.type == "cuda":
            print(f"    peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
        del emb

        # (b) decode: prefill the prompt once into row 0, copy it to every row, then greedy steps
        lm = cfg.lm
        hd = lm.hidden_size // lm.num_attention_heads
        elt = torch.finfo(dtype).bits // 8
        weight_bytes = (sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
                        + model.lm_head.weight.numel()) * elt
        _, next_pos = rope_index(ids, grid, lm.image_token_id, cfg.vision.spatial_merge_size)
        print()
        print(f"(b) decode after a {T}-token prefill, {args.decode_warmup} warm-up + {n_steps} timed steps, greedy")
        print(f"    {'batch':>5s} {'ms/step':>9s} {'tokens/s':>10s} {'GB read/step':>13s} {'TB/s':>8s} {'% BW':>7s} "
              f"{'TFLOP/s':>8s}")
        for B in batches:
            total = args.decode_warmup + n_steps
            cache = model.new_cache(batch=B, max_len=T + total)
            logits = model(ids, pv, grid, q_ids, q_mask, i2q, cache=cache.view_rows(0, 1),
                           cache_pos=torch.zeros(1, dtype=torch.long, device=device))
            if B > 1:
                cache.copy_rows([0] * (B - 1), list(range(1, B)))
            tok = logits[:, -1:].argmax(-1).expand(B, 1).contiguous()
            del logits
            ts, ends = [], []
            for s in range(total):
                cache_pos = torch.full((B,), T + s, dtype=torch.long, device=device)
                pos = (next_pos + s).view(1, 1, 1).expand(3, B, 1).to(device)
                dt, logits = timed(lambda: model(tok, position_ids=pos, cache=cache, cache_pos=cache_pos), device)
                tok = logits[:, -1:].argmax(-1)
                if s >= args.decode_warmup:
                    ts.append(dt)
                    ends.append(T + s + 1)  # cache slots each row's attention reads this step
            step = statistics.median(ts)
            end = statistics.mean(ends)
            kv_bytes = lm.num_hidden_layers * 2 * B * lm.num_key_value_heads * end * hd * elt
            read = weight_bytes + kv_bytes + B * lm.hidden_size * elt  # + the B embedding rows
            bw = read / step / 1e12
            tf = flops_lm_decode_step(lm, B, end) / step / 1e12
            print(f"    {B:5d} {step * 1e3:9.2f} {B / step:10.1f} {read / 1e9:13.4g} {bw:8.3g} "
                  f"{100 * bw / args.peak_bw:6.3g}% {tf:8.3g}")
            del cache, logits
        print(f"    bytes read/step = LM weights ({weight_bytes / 1e9:.3f} GB, vision/inquiry/embedding table not read) "
              f"+ KV cache slots attended; ms/step = median")


# -----------------------------------------------------------------------------
# subcommands


def cmd_model(args):
    if args.arch is None:
        assert args.device == "cpu", "the comparison with transformers runs on CPU; use --arch for --device cuda"
        model_vs_transformers(args)
    else:
        model_throughput(args)


# -----------------------------------------------------------------------------
# rollout: our batched multi-turn generation vs transformers' generate (CPU, tiny checkpoint)


def generate_inputs(prompts, ct, budget, pad_id):
    """transformers' generate inputs for rollout.Prompts: exactly our token ids (rollout's own
    rendering), left padded with pad_id (generate's convention), and the images' patches."""
    import rollout
    rows, pvs, grids = [], [], []
    for p in prompts:
        ctx, ids = rollout.encode_prompt(p, ct, budget)
        rows.append(ids)
        enc = ctx.encoder_inputs(ctx.views, ct)
        pvs.append(enc["pixel_values"])
        grids.append(enc["grid_thw"])
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, torch.cat(pvs), torch.cat(grids)


def hf_generate(hf, prompts, ct, budget, pad_id, image_pad_id, n, scores=False):
    """(B, n) greedy tokens of transformers' generate after our prompts (exactly n each), and with
    scores=True its (B, n, vocab) logits of each step too (the end token's held at -inf)."""
    ids, mask, pv, grid = generate_inputs(prompts, ct, budget, pad_id)
    out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=pad_id, output_scores=scores,
                      return_dict_in_generate=True,
                      **mm_types(ids, image_pad_id))  # 5.x computes M-RoPE positions only with these
    tokens = out.sequences[:, ids.shape[1]:]
    return (tokens, torch.stack(out.scores, 1)) if scores else tokens


def first_turn(traj):
    """A rollout.Trajectory's tokens up to its first observation (a random model may call a tool)."""
    k = next((j for j in range(traj.prompt_len, len(traj.ids)) if not traj.policy_mask[j]), len(traj.ids))
    return traj.ids[traj.prompt_len:k]


def cmd_rollout(args):
    """Generated tokens/s of rollout.rollout (static KV cache, one batched decode step per token)
    against transformers' generate on the same tiny checkpoint, the same prompt token ids (our
    Figure 15/16 rendering of one image + a question) and the same number of new tokens."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    import data
    import rollout
    import tiny_tokenizer
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    corpus = [data.SYSTEM_PROMPT, data.CHAT_INSTRUCTIONS, data.CONTINUE_NOTE] + [
        f"What is in picture number {i}? The index of the provided image is {i}." for i in range(10)]
    tok = tiny_tokenizer.train_tokenizer(os.path.join(tmp, "tok"), corpus)
    sp = {k: tok.convert_tokens_to_ids(t) for k, t in (("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"),
          ("image_pad", "<|image_pad|>"), ("video_pad", "<|video_pad|>"), ("bos", "<|endoftext|>"), ("eos", "<|im_end|>"))}
    tiny_hf_checkpoint(os.path.join(tmp, "ckpt"), args.seed, vocab=len(tok), ids=sp)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(tmp, "ckpt"), dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    ours = ViLaVT.from_pretrained(os.path.join(tmp, "ckpt"))
    ct = data.ChatTokenizer(tok)
    budget = data.Budget(max_pixels=args.max_pixels)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, CPU; greedy; "
          f"prompt = system + one {args.max_pixels}-pixel image + question")
    print(f"{'batch':>5s} {'new tokens':>10s} {'ours tok/s':>11s} {'hf tok/s':>9s} {'ratio ours/hf':>13s} "
          f"{'prompt tokens':>13s} {'same tokens':>11s}")
    ratios = []
    for B, N in [(int(b), int(n)) for b in args.batches.split(",") for n in args.new_tokens.split(",")]:
        imgs = [Image.fromarray(np.random.default_rng(args.seed + i).integers(0, 255, (336, 448, 3), np.uint8))
                for i in range(B)]
        prompts = [rollout.Prompt([im], f"What is in picture number {i}?") for i, im in enumerate(imgs)]
        T = generate_inputs(prompts, ct, budget, sp["bos"])[0].shape[1]
        limits = rollout.Limits(max_turn_tokens=N, max_new_tokens=N, max_context=T + N + 8)

        def ours_rollout():
            return rollout.rollout(ours, ct, prompts, 1, rollout.Sampling(greedy=True), limits, budget)

        def hf_rollout():  # the image preprocessing is timed on both sides (the rollout does its own)
            return hf_generate(hf, prompts, ct, budget, sp["bos"], sp["image_pad"], N)

        with torch.no_grad():  # the same greedy tokens, or the two would time different work (also the warm-up)
            same = sum(h[:len(first_turn(t))].tolist() == first_turn(t) for t, h in zip(ours_rollout(), hf_rollout()))
            res = {}
            for name, fn in (("ours", lambda: sum(sum(t.policy_mask) for t in ours_rollout())),
                             ("hf", lambda: hf_rollout().numel())):
                times, n = [], 0
                for _ in range(args.iters):
                    dt, n = timed(fn, "cpu")
                    times.append(dt)
                res[name] = n / statistics.median(times)
        ratios.append(res["ours"] / res["hf"])
        print(f"{B:5d} {N:10d} {res['ours']:11.0f} {res['hf']:9.0f} {ratios[-1]:13.2f} {T:13d} {f'{same}/{B}':>11s}",
              flush=True)
    print("(ours may stop a row early at <|im_end|> or </tool>; tokens/s counts the tokens each generated; same "
          "tokens: rows whose greedy tokens, up to our first stop, are generate's)")
    print(f"rollout speed-up vs generate: min {min(ratios):.2f}x, max {max(ratios):.2f}x")


# -----------------------------------------------------------------------------
# plan: will it fit? (memplan.py)

PLAN_DEFAULTS = {  # the sample of the paper's setting, per script (see the plan subparser's help)
    "sft": dict(images="32x32", crops="124x256"),
    "grpo": dict(images="128x256", crops="160x160"),
}


def cmd_plan(args):
    """Peak memory per GPU of one step at --world-size, on fake tensors in this process; with
    --real, on real tensors of this machine's device (torchrun for a world > 1)."""
    import memplan
    import training
    torch.set_num_threads(args.threads)
    cfg = config_from_hf(read_json(args.config), read_json(args.embedder_config) if args.embedder_config else None,
                         args.config)
    images, crops = args.images or PLAN_DEFAULTS[args.kind]["images"], args.crops or PLAN_DEFAULTS[args.kind]["crops"]
    spec = argparse.Namespace(seq_len=args.seq_len, prompt_tokens=args.prompt_tokens, originals=parse_images(images),
                              crops=[] if crops == "none" else parse_images(crops), inquiry=args.inquiry_tokens,
                              micro_batches=args.micro_batches)
    flags = args.flags.split()
    if not args.real:
        text, result = memplan.plan(args.kind, cfg, args.world_size, spec, flags)
        print(text)
    else:
        with training.distributed() as (rank, world, device):
            text, result = memplan.plan(args.kind, cfg, world, spec, flags, device=device.type, real=True)
            training.print0(text)
            if device.type == "cuda":  # (not yet run: no GPU was lent to the session that wrote this)
                training.print0(f"torch.cuda.max_memory_allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB,"
                                f" max_memory_reserved: {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB")
    if args.json and int(os.environ.get("RANK", 0)) == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("model", help="model speed: vs transformers (default), or throughput with --arch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=["tiny", "7b"], default=None,
                   help="throughput mode at this architecture (random weights); omitted: compare with transformers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="throughput mode only (the comparison is fp32)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", default=None,
                   help="image patch grids HxW, comma separated (comparison default 36x44,20x28,52x30)")
    p.add_argument("--seq-len", type=int, default=None, help="total prompt tokens (comparison default 1536)")
    p.add_argument("--profile", action="store_true", help="comparison: torch.profiler table of one fwd+bwd each")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--query-tokens", type=int, default=0,
                   help="throughput: >0 puts all images in one query group with an inquiry of this many tokens")
    p.add_argument("--batches", default=None, help="throughput: decode batch sizes (7b default 1,32; tiny 1,4)")
    p.add_argument("--decode-steps", type=int, default=None, help="throughput: timed decode steps (7b 32, tiny 8)")
    p.add_argument("--decode-warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense peak")
    p.add_argument("--peak-bw", type=float, default=3.35, help="memory bandwidth peak, TB/s (H100 SXM)")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("rollout", help="batched rollout generation vs transformers' generate (CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="prompts decoded together")
    p.add_argument("--new-tokens", default="32,256", help="tokens generated per row (an RL turn is hundreds)")
    p.add_argument("--max-pixels", type=int, default=224 * 224, help="image size (pixels) of each prompt")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--iters", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("plan", help="will it fit? peak memory per GPU of one SFT or GRPO step at --world-size, "
                                    "measured on fake tensors on this CPU (memplan.py)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=["sft", "grpo"])
    configs = os.path.join(SHARED, "fixtures", "configs")
    p.add_argument("--config", default=os.path.join(configs, "qwen2_5_vl_7b_instruct.config.json"),
                   help="the model's config.json (Qwen2.5-VL or ViLaVT)")
    p.add_argument("--embedder-config", default=os.path.join(configs, "qwen3_embedding_0_6b.config.json"),
                   help="the Qwen3-Embedding config.json ('' for a ViLaVT or vanilla config alone)")
    p.add_argument("--world-size", type=int, default=8, help="GPUs the step is sharded over (FSDP2)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens of a sample (default: sft --max-length, 24,576; grpo --max-context, 16,384)")
    p.add_argument("--images", default=None,
                   help="the originals' patch grids HxW (4 patches a token). Default sft 32x32: one 256-token original "
                        "(the release's --max-pixels); grpo 128x256: the whole 8,192-token budget")
    p.add_argument("--crops", default=None,
                   help="one tool call's crops, one encoder group with the inquiry ('none': no tool call). Default sft "
                        "124x256 (7,936 tokens: 8,192 visual in all); grpo 160x160 (6,400: the largest that leaves "
                        "1,275 policy tokens in the trajectory)")
    p.add_argument("--inquiry-tokens", type=int, default=50, help="the tool call's inquiry (its cap: 50)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="a prompt's text (Figures 15/16 + question: ~500)")
    p.add_argument("--micro-batches", type=int, default=2,
                   help="micro-batches before the optimizer step (the 3rd and later repeat the 2nd's memory)")
    p.add_argument("--flags", default="", help="the script's flags on top of its defaults, e.g. '--max-context 8192'")
    p.add_argument("--real", action="store_true",
                   help="real tensors on this machine's device, random weights (torchrun for a world > 1; "
                        "--world-size is then torchrun's): the same step, measured by the same tracker")
    p.add_argument("--json", help="also write the breakdown, in bytes per phase and category, to this file")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.set_defaults(func=cmd_plan)

    args = ap.parse_args()
    if args.cmd == "model" and args.arch is None:
        args.images = args.images or "36x44,20x28,52x30"
        args.seq_len = args.seq_len or 1536
    args.func(args)


if __name__ == "__main__":
    main()
