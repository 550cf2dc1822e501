"""
Multi-turn "chatting with images" generation (paper section 3.1, Eq. 1) with a static KV cache.

    s_{t+1} ~ M(. | f_0, Q, {(s_k, f_k)}_{k<=t}),   f_k = V(crops_k, q_k)

A batch of B prompts x G samples decodes together. Each prompt is prefilled once and its
cache copied to its G rows. Every step feeds exactly one token per live row in one batched
call; when a row's turn ends in a tool call, the environment validates it, crops (data.py's
crop rule), re-encodes the crops jointly with the inquiry as one new encoder group, and
prefills the observation into that row's cache before the row rejoins the batch. Rows
finish independently and are dropped from the cache, so they stop costing compute.

The returned Trajectory keeps the exact token ids, which of them the policy generated, and
everything the encoder saw, so grpo.py recomputes log-probs on exactly the same tokens.

    model, ct = rollout.load("out/sft/latest")          # the model and its ChatTokenizer
    answer, traj = rollout.ask(model, ["photo.jpg"], "What is written on the sign?", ct)
"""

from dataclasses import dataclass, field

import torch
from PIL import Image

import data
from data import Budget, ChatTokenizer, Context, observation_parts, prompt_parts
from pixels import crop_geometry, load_image, to_rgb
from model import ViLaVT, rope_index
from reward import MAX_IMAGES, parse_turn, validate_tool_call


@dataclass
class Sampling:
    temperature: float = 1.0  # paper: 0.75 at evaluation; the release trained RL at 1.0
    top_p: float = 1.0  # paper: 0.9
    top_k: int = 0  # 0 = off
    greedy: bool = False
    seed: int = 0


@dataclass
class Limits:
    max_tool_calls: int = 5  # T_max when a prompt has none (SPEC 4: 5 general, 10 spatial)
    max_images: int = MAX_IMAGES  # visual inputs per trajectory, originals included (52)
    max_turn_tokens: int = 1024  # policy tokens per assistant turn
    max_new_tokens: int = 4096  # policy tokens per trajectory
    max_context: int = 16384  # most KV-cache slots per row (prompt + turns + observations); allocated as used


@dataclass
class Prompt:
    images: list  # PIL images (originals, or video frames)
    question: str  # with options already appended (data.format_question)
    max_tool_calls: int | None = None
    max_pixels: int | None = None  # per original image; None = the budget's share
    system: str = data.SYSTEM_PROMPT  # the paper's Figure 15
    instructions: str | None = None  # text after the question; None = Figure 16's tool/answer formats
    user: str | None = None  # a whole user turn with '<image>' placeholders (replaces Figure 16)
    initial: data.Initial = data.Initial()  # the originals' encoder groups and inquiry (default: each alone, none)
    inquiry: str = ""  # the question as initial.inquiry puts it in the encoder: without options or instructions
    seed: int | None = None  # sample g draws from its own generator seeded (seed, g), so what a prompt's samples
    #   are does not depend on the batch it was in; None: (Sampling.seed, the prompt's number in the call)
    # (a record's prompt: Prompt(images, max_tool_calls=..., **data.record_prompt(rec)))


@dataclass
class Trajectory:
    ids: list  # every token of the conversation
    policy_mask: list  # 1 where the policy generated the token (observations, image pads, headers: 0)
    context: Context  # originals and crops (regions, bboxes, parents), encoder groups, queries
    prompt_len: int
    turns: list = field(default_factory=list)  # decoded assistant turns (without <|im_end|>)
    n_images_at_turn: list = field(default_factory=list)  # images in context when each turn was written
    n_tool_calls: int = 0  # tool rounds, valid or not
    n_invalid: int = 0
    errors: list = field(default_factory=list)  # the reason of each rejected tool call
    finish: str = ""  # answer | no_answer | max_tool_calls | turn_limit | length | context_full

    @property
    def answer(self):
        return parse_turn(self.turns[-1]).answer if self.turns else None

    def image_sizes(self):
        return [v.display for v in self.context.views]

    def encoder_inputs(self, ct):
        return self.context.encoder_inputs(self.context.views, ct)


# -----------------------------------------------------------------------------
# sampling


def sample(logits, s: Sampling, gens):
    """logits (n, V) -> tokens (n,). Temperature, then top-k, then top-p (nucleus); row i draws
    from generator gens[i]."""
    if s.greedy or s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


# -----------------------------------------------------------------------------
# one row of the batch


@dataclass
class _Row:
    traj: Trajectory
    t_max: int
    feed: list  # tokens to feed next (the last one goes through the batched step)
    feed_enc: dict | None = None  # encoder inputs of the image blocks inside `feed`
    cache_len: int = 0  # cache slots written
    next_pos: int = 0  # next M-RoPE text position
    turn: list = field(default_factory=list)  # current turn's policy tokens
    n_new: int = 0


def _append(row, ids, policy):
    row.traj.ids += ids
    row.traj.policy_mask += [int(policy)] * len(ids)


def _positions(ids, grids, start, image_token_id):
    pos, nxt = rope_index(torch.tensor([ids]), grids, image_token_id)
    return pos + start, int(nxt[0]) + start


def _on_device(model, enc, device):
    # The images are encoded inside the prefill's forward (not by a separate encode_images
    # call): with FSDP2 every forward must enter through the root module.
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(model.visual.patch_embed.proj.weight.dtype)
    return enc


# The blank-crops ablation's fill: plain mid grey, the same image whatever the encoder's
# normalisation (the CLIP-mean grey, (123, 117, 104) in 8 bits, would give an input of ~0 instead
# of 128's flat 0.08, 0.17, 0.34 std per channel). A flat image carries no content at any grey
# level, and stays flat through preprocess_image's resize.
BLANK_GREY = (128, 128, 128)


def grey_crops(ctx, call):
    """Flat grey images, one per region of a validated tool call, each of the size its real crop
    would have (pixels.crop_geometry: the crop rule without cutting), for Context.zoom's crop_files:
    the same display sizes and image tokens, none of the content. Raises ValueError as the real
    crop would (a crop too thin to encode)."""
    grey = []
    for r in call["region"]:
        parent = ctx.views[r["index"]]
        _, size = crop_geometry(ctx.originals[parent.source].size, parent.region, parent.display, r["bbox_2d"])
        grey.append(Image.new("RGB", size, BLANK_GREY))
    return grey


def _end_turn(row, tok, model, ct, limits, device, inquiry, blank_crops):
    """Called after a policy token; decides what comes next: more of this turn, an
    observation, or the end. Returns the finish reason or None."""
    traj = row.traj
    is_eos = tok in ct.eos_ids
    tail = ct.decode(row.turn[-8:])
    if not is_eos and "</tool>" not in tail:
        if len(row.turn) >= limits.max_turn_tokens:
            return "turn_limit"
        if row.n_new >= limits.max_new_tokens:
            return "length"
        row.feed = [tok]
        return None
    text = ct.decode(row.turn[:-1] if is_eos else row.turn)
    traj.turns.append(text)
    traj.n_images_at_turn.append(len(traj.context.views))
    row.turn = []
    turn = parse_turn(text)
    if is_eos or turn.tool is None and turn.error is None:
        return "answer" if turn.answer is not None else "no_answer"
    # a tool call: the environment closes the assistant turn and writes the observation. The
    # turn stops at </tool>, so the <|im_end|> after it is the environment's (no RL loss), while
    # SFT trains it; an invalid call gets an error observation and the row goes on (the release
    # ended training rollouts silently; SPEC 4).
    ctx = traj.context
    traj.n_tool_calls += 1
    if traj.n_tool_calls > row.t_max:
        return "max_tool_calls"
    last_round = traj.n_tool_calls == row.t_max
    error = turn.error or validate_tool_call(turn.tool, traj.image_sizes(), limits.max_images)  # as the reward
    new, enc = [], None
    if error is None:
        call = turn.tool if inquiry else dict(turn.tool, query="")
        try:
            new = ctx.zoom(call, grey_crops(ctx, call) if blank_crops else None)
        except ValueError as e:  # e.g. a crop too thin to encode
            error = str(e)
    if error is None:
        enc = _on_device(model, ctx.encoder_inputs(new, ct), device)  # the new crops only: one group, with the query
    else:
        traj.n_invalid += 1
        traj.errors.append(error)
    parts = observation_parts(len(ctx.views) - len(new), [v.display for v in new], last_round, error)
    env = [ct.im_end] + ct.encode_parts(parts, [v.n_tokens for v in new])
    if row.cache_len + 1 + len(env) + 1 > limits.max_context:
        if new:  # the observation does not fit: its crops never enter the trajectory (their tokens are not in it)
            del ctx.views[-len(new):]
            ctx.queries.pop()
        return "context_full"
    _append(row, env, policy=False)
    row.feed, row.feed_enc = [tok] + env, enc
    return None


# -----------------------------------------------------------------------------
# the batched loop


CACHE_CHUNK = 256  # KV-cache slots added at a time, at least (or half the current size)


def encode_prompt(p, ct, budget=Budget()):
    """A Prompt's Context (its originals at the budget's size) and its token ids (Figures 15/16)."""
    ctx = Context.of(p.images, budget, p.max_pixels, p.initial, p.inquiry)
    parts = prompt_parts([v.display for v in ctx.views], p.question, p.system, p.user, p.instructions)
    return ctx, ct.encode_parts(parts, [v.n_tokens for v in ctx.views])


@torch.no_grad()
def rollout(model, ct, prompts, group_size=1, sampling=Sampling(), limits=Limits(), budget=Budget(), inquiry=True,
            blank_crops=False):
    """Roll out len(prompts) x group_size trajectories; row b*G + g is sample g of prompt b.
    The token log-probs are not kept: GRPO recomputes them on the returned tokens. Two ablations:
    inquiry=False is the paper's "w/o inquiry" (section 4.4, q = empty set): each tool call's crops
    are still encoded jointly as one group, but with no inquiry tokens; the policy's text keeps its
    query. blank_crops=True (ours, issue 12) replaces every crop by a flat grey image of the real crop's
    size (grey_crops): the model sees where it zoomed and gets as many image tokens, not what is
    there, so the answers' change measures how much they depend on what the zooms show."""
    device = model.lm_head.weight.device
    image_token = model.cfg.lm.image_token_id
    G, n = group_size, len(prompts) * group_size
    base = [sampling.seed * 1_000_003 + b if p.seed is None else p.seed for b, p in enumerate(prompts)]
    gens = [torch.Generator(device=device).manual_seed((base[b] * 1009 + g) % 2**63)  # row b*G + g's own stream
            for b in range(len(prompts)) for g in range(group_size)]
    banned = torch.tensor([ct.image_pad, ct.vision_start, ct.vision_end], device=device)
    rows = []
    # ---- prefill all prompts in one right-padded batch (all but each one's last token) into
    # cache rows 0..B-1, then copy prompt b to its G rows b*G..b*G+G-1. Slots past a row's own
    # length hold padding garbage that its decode steps overwrite before they ever attend to it.
    ctxs, prompt_ids, encs = [], [], []
    for b, p in enumerate(prompts):
        ctx, ids = encode_prompt(p, ct, budget)
        assert len(ids) + 1 < limits.max_context, f"prompt {b}: {len(ids)} tokens exceed max_context"
        ctxs.append(ctx), prompt_ids.append(ids), encs.append(ctx.encoder_inputs(ctx.views, ct))
    L = max(len(ids) for ids in prompt_ids) - 1
    # the cache grows with use (below): it starts at the prompts plus a chunk, not at max_context
    cache = model.new_cache(n, min(limits.max_context, L + 1 + CACHE_CHUNK))
    batch_ids = torch.tensor([ids[:-1] + [ct.im_end] * (L + 1 - len(ids)) for ids in prompt_ids])
    # Eq. 1's f_0 = V(I, q_0): the originals, encoded once per prompt (not per sample), each image
    # its own group with no inquiry (q_0 = empty set), unless the prompt's `initial` says otherwise
    enc = _on_device(model, Context.merge_encoder_inputs(encs), device)
    pos, _ = rope_index(batch_ids, enc["grid_thw"].cpu(), image_token)
    model.hidden_states(batch_ids.to(device), **enc, position_ids=pos.to(device), cache=cache.view_rows(0, len(prompts)),
                        cache_pos=torch.zeros(len(prompts), dtype=torch.long, device=device))
    for b in reversed(range(len(prompts))):  # descending: a target row never holds a prompt still to copy
        cache.copy_rows([b] * G, list(range(b * G, b * G + G)), n=L)
    for b, p in enumerate(prompts):
        ids = prompt_ids[b]
        next_pos = int(pos[:, b, :len(ids) - 1].max()) + 1  # the last prompt token is text: max + 1
        for g in range(G):
            c = ctxs[b] if g == 0 else _copy_context(ctxs[b])
            traj = Trajectory(ids=list(ids), policy_mask=[0] * len(ids), context=c, prompt_len=len(ids))
            t_max = p.max_tool_calls if p.max_tool_calls is not None else limits.max_tool_calls
            rows.append(_Row(traj, t_max, feed=[ids[-1]], cache_len=len(ids) - 1, next_pos=next_pos))
    live = list(range(n))  # row i of the cache holds rows[live[i]]
    while live:
        need = max(rows[r].cache_len + len(rows[r].feed) for r in live)  # <= max_context (_end_turn checks)
        if need > cache.max_len:  # grow in chunks, copying only the written slots
            cache.grow(min(limits.max_context, need + max(CACHE_CHUNK, cache.max_len // 2)),
                       n=max(rows[r].cache_len for r in live))
        # ---- observations: prefill all but the last fed token, one row at a time
        for i, r in enumerate(live):
            row = rows[r]
            if len(row.feed) > 1:
                chunk, enc = row.feed[:-1], row.feed_enc or {}
                pos, nxt = _positions(chunk, enc.get("grid_thw"), row.next_pos, image_token)
                model.hidden_states(torch.tensor([chunk], device=device), **enc, position_ids=pos.to(device),
                                    cache=cache.view_rows(i, i + 1),
                                    cache_pos=torch.tensor([row.cache_len], device=device))
                row.next_pos = nxt  # the held-back last token (the assistant header's '\n') is text
                row.cache_len += len(chunk)
                row.feed, row.feed_enc = row.feed[-1:], None
        # ---- one batched decode step: one token per live row
        x = torch.tensor([[rows[r].feed[0]] for r in live], device=device)
        cache_pos = torch.tensor([rows[r].cache_len for r in live], device=device)
        pos = torch.tensor([rows[r].next_pos for r in live], device=device).view(1, -1, 1).expand(3, -1, 1)
        logits = model(x, position_ids=pos, cache=cache, cache_pos=cache_pos)[:, -1].float()
        # the policy never writes image blocks: a sampled <|image_pad|> would be an image slot
        # with no image behind it (GRPO's log-probs are those of the unmasked model)
        toks = sample(logits.index_fill(-1, banned, float("-inf")), sampling, [gens[r] for r in live])
        toks = toks.tolist()  # one host sync per step
        keep = []
        for i, r in enumerate(live):
            row = rows[r]
            row.cache_len += 1
            row.next_pos += 1
            tok = toks[i]
            _append(row, [tok], policy=True)
            row.turn.append(tok)
            row.n_new += 1
            finish = _end_turn(row, tok, model, ct, limits, device, inquiry, blank_crops)
            if finish is None and row.cache_len + 1 >= limits.max_context:
                finish = "context_full"
            if finish is None:
                keep.append(i)
            else:
                if row.turn:  # a turn cut short still counts as the last turn
                    row.traj.turns.append(ct.decode(row.turn))
                    row.traj.n_images_at_turn.append(len(row.traj.context.views))
                row.traj.finish = finish
        if len(keep) < len(live):
            if keep:
                cache.select_rows(torch.tensor(keep, device=device), n=max(rows[live[i]].cache_len for i in keep))
            live = [live[i] for i in keep]
    return [row.traj for row in rows]


def _copy_context(ctx):
    """A sample's own Context (its crops differ from its siblings'); originals are shared."""
    c = Context.__new__(Context)
    c.__dict__.update(ctx.__dict__)
    c.views, c.queries = list(ctx.views), list(ctx.queries)
    return c


# -----------------------------------------------------------------------------
# one-call API


def load(model_dir, embedder_dir=None, dtype=torch.float32, device="cpu"):
    """(model, ChatTokenizer) from a checkpoint folder. The LM tokenizer lives in the folder;
    the inquiry tokenizer in its query_tokenizer/ (our checkpoints) or the embedder folder."""
    model = ViLaVT.from_pretrained(model_dir, embedder_dir, dtype=dtype, device=device)
    return model, ChatTokenizer.load(model_dir, model.cfg, embedder_dir)


def ask(model, images, question, ct, options=None, max_tool_calls=5, sampling=Sampling(greedy=True),
        limits=Limits(), budget=Budget(), initial=data.Initial()):
    """Answer one question about one or more images (paths or PIL images), chatting with
    them as needed; `initial` groups the originals in the encoder (data.Initial).
    Returns (answer text or None, Trajectory)."""
    imgs = [load_image(i) if isinstance(i, str) else to_rgb(i) for i in images]  # transparency as load_image
    p = Prompt(imgs, data.format_question(question, options), max_tool_calls, initial=initial, inquiry=question)
    traj = rollout(model, ct, [p], 1, sampling, limits, budget)[0]
    return traj.answer, traj
