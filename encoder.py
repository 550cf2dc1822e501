"""
The dynamic vision encoder of ViLaVT (paper section 3.2) and its inquiry text encoder.

Vision tower: Qwen2.5-VL's ViT (patch 14, 2x2 patch merger, window attention over
112 px windows, 2-D rotary) with the ViLaVT change read off the authors' release:

    layers 0-6, 8-14    window attention inside one image
    layers 7, 15        full attention inside one image (per frame)
    layers 16-31        "query-aware": full attention across ALL images of one group,
                        and the image tokens also attend to the group's inquiry tokens

Paper vs release: Eq. 2 writes V_e(P_1 + ... + P_U + h_q), the inquiry concatenated into the
ViT sequence. The released weights instead inject the inquiry as extra keys/values in the
query-aware layers only (text never issues queries and never passes through norms, MLPs or
residuals). We follow the release, since checkpoint compatibility is a hard requirement.

Inquiry encoder: a frozen Qwen3 model (Qwen3-Embedding-0.6B), token-level last_hidden_state,
no pooling; `text_proj` (owned by model.ViLaVT) maps it 1024 -> 1280 for every query-aware layer.

Attention never builds a mask over the whole image sequence: tokens are split into
contiguous segments (windows, frames, groups), segments of equal shape are batched into one
SDPA call, so memory grows with sum(L_segment^2), not with (sum L)^2.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import MLP, DecoderBlock, RMSNorm, apply_rotary, rope_inv_freq


@dataclass
class VisionConfig:
    depth: int = 32  # ViT blocks
    hidden_size: int = 1280  # ViT width
    intermediate_size: int = 3420  # SwiGLU hidden width
    num_heads: int = 16  # head dim 80
    out_hidden_size: int = 3584  # merger output = LM width
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2  # a still image is its own frame duplicated
    spatial_merge_size: int = 2  # 2x2 patches -> one LM token
    window_size: int = 112  # px; 8x8 patches = 4x4 merge units per window
    fullatt_block_indexes: tuple = (7, 15, 23, 31)  # full attention inside one image (per frame)
    query_layers: tuple = ()  # ViLaVT query-aware layers; () = vanilla Qwen2.5-VL
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    text_dim: int = 1024  # width of the inquiry encoder feeding text_proj
    initializer_range: float = 0.02


@dataclass
class InquiryConfig:  # Qwen3-Embedding-0.6B
    vocab_size: int = 151669
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_tokens: int = 50  # inquiry truncation length, <|endoftext|> included (SPEC 2)
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the config.json as read


# -----------------------------------------------------------------------------
# Segment attention: SDPA over contiguous segments, batched by shape


@dataclass
class Segments:
    """A partition of the (window-ordered) token sequence into contiguous attention segments,
    bucketed by shape: one batched SDPA call per bucket."""
    cu: list  # segment i = tokens cu[i]:cu[i+1]
    tcu: list  # segment i also attends to text keys tcu[i][0]:tcu[i][1]
    buckets: list  # [(L, n_text, [segment ids], start)]: in bucket order, a bucket's segments lie
    #                consecutively from `start`, so each bucket is one free view
    perm: torch.Tensor | None  # token order -> bucket order (None: they are the same)
    inverse: torch.Tensor | None


def make_segments(cu, tcu=None, device=None):
    n = len(cu) - 1
    tcu = tcu if tcu is not None else [(0, 0)] * n
    groups = {}
    for i in range(n):
        groups.setdefault((cu[i + 1] - cu[i], tcu[i][1] - tcu[i][0]), []).append(i)
    buckets, start = [], 0
    for (L, nt), ids in groups.items():
        buckets.append((L, nt, ids, start))
        start += L * len(ids)
    order = [i for _, _, ids, _ in buckets for i in ids]
    perm = inverse = None
    if order != list(range(n)):
        perm = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in order]).to(device)
        inverse = torch.argsort(perm)
    return Segments(cu, tcu, buckets, perm, inverse)


class _Permute(torch.autograd.Function):
    """x[perm] along dim 0, whose backward gathers by the inverse permutation. (Plain indexing
    or per-segment slicing would scatter-add into zero-filled buffers in backward: that was 27%
    of the vision tower's fwd+bwd time with ragged windows; see bench.py model --profile.)"""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def segment_attention(q, k, v, seg, tk=None, tv=None):
    # q, k, v: (N, H, D) image tokens; tk, tv: (n_text, H, D) text keys/values (query-aware layers)
    if seg.perm is not None:  # bucket order: every bucket becomes one contiguous block
        q, k, v = (_Permute.apply(x, seg.perm, seg.inverse) for x in (q, k, v))
    outs = []
    for L, nt, ids, start in seg.buckets:
        n = len(ids)
        qs, ks, vs = (x[start:start + n * L].view(n, L, *x.shape[1:]) for x in (q, k, v))  # (n, L, H, D)
        if nt:  # a group's image tokens also attend to the group's inquiry tokens (keys/values only)
            ks = torch.cat([ks, torch.stack([tk[slice(*seg.tcu[i])] for i in ids])], 1)
            vs = torch.cat([vs, torch.stack([tv[slice(*seg.tcu[i])] for i in ids])], 1)
        # (n, L, H, D) -> (n, H, L, D); non-causal, scale 1/sqrt(D)
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))
        outs.append(o.transpose(1, 2).reshape(n * L, -1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out if seg.perm is None else _Permute.apply(out, seg.inverse, seg.perm)


def rotary_cos_sin(pos, head_dim, theta):
    # pos: (n, 2) long (row, col) -> cos/sin (n, head_dim): 20 frequencies for rows, 20 for cols, doubled
    inv = rope_inv_freq(head_dim // 2, theta, pos.device)
    freqs = (pos[:, :, None].float() * inv).flatten(1)  # (n, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_fp32(x, cos, sin):
    # the vision tower applies its rotary in fp32 and casts back (as transformers does)
    return apply_rotary(x.float(), cos[:, None, :], sin[:, None, :]).to(x.dtype)


# -----------------------------------------------------------------------------
# The layout of one encoder call: windows, frames, groups, rotary positions


@dataclass
class Layout:
    pos: torch.Tensor  # (N, 2) rotary (row, col) of each image token, window order
    tpos: torch.Tensor | None  # (n_text,) rotary position of each text key (row = col)
    window_index: torch.Tensor  # merge-unit permutation into window order
    reverse: torch.Tensor  # its inverse, applied after the merger
    cos: torch.Tensor  # (N, head_dim) image-token rotary, window order
    sin: torch.Tensor
    tcos: torch.Tensor | None  # (n_text, head_dim) text-key rotary
    tsin: torch.Tensor | None
    windows: Segments  # window layers
    frames: Segments  # full layers: one segment per image frame
    groups: Segments  # query-aware layers: one segment per group, plus its text


def make_layout(cfg, grid_thw, text_lens, image_to_query, device):
    """All index bookkeeping for one call, computed once and shared by every block.

    grid_thw: (n_img, 3) in patch units. text_lens[g]: number of inquiry tokens of group g.
    image_to_query[i]: group of image i; each group's images must be contiguous.
    """
    m = cfg.spatial_merge_size
    unit = m * m
    win = cfg.window_size // m // cfg.patch_size  # window side in merge units (4)
    grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
    n_img = len(grids)
    if image_to_query is None:
        image_to_query = list(range(n_img))  # initial encoding: each image alone, no inquiry
    else:
        image_to_query = [int(g) for g in (image_to_query.tolist() if torch.is_tensor(image_to_query) else image_to_query)]
    assert len(image_to_query) == n_img, f"image_to_query has {len(image_to_query)} entries for {n_img} images"

    # Groups: runs of equal group id; a group id may not come back after another group.
    runs = []  # [(group id, first image, end image)]
    for i, g in enumerate(image_to_query):
        if runs and runs[-1][0] == g:
            runs[-1][2] = i + 1
        else:
            assert all(r[0] != g for r in runs), f"images of query group {g} are not contiguous: {image_to_query}"
            runs.append([g, i, i + 1])
    n_groups = max(image_to_query) + 1
    text_lens = [0] * n_groups if text_lens is None else list(text_lens)
    assert len(text_lens) >= n_groups, f"{len(text_lens)} inquiries for group ids up to {n_groups - 1}"
    toff = [0]
    for n in text_lens:
        toff.append(toff[-1] + n)

    window_index, cu_win, cu_frame, img_start, pos = [], [0], [0], [0], []
    offset_in_group = {}  # group -> running diagonal offset O_j (patch units)
    for i, (t, h, w) in enumerate(grids):
        assert h % m == 0 and w % m == 0, f"image {i}: grid {h}x{w} is not a multiple of the merge size {m}"
        lh, lw = h // m, w // m
        # window order of merge units (transformers' get_window_index, per frame)
        idx = torch.arange(t * lh * lw).view(t, lh, lw)
        ph, pw = (win - lh % win) % win, (win - lw % win) % win
        idx = F.pad(idx, (0, pw, 0, ph), value=-1)
        nh, nw = (lh + ph) // win, (lw + pw) // win
        idx = idx.view(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        counts = (idx >= 0).sum(-1).flatten()
        idx = idx.flatten()
        window_index.append(idx[idx >= 0] + img_start[-1] // unit)
        for c in counts.tolist():
            if c:
                cu_win.append(cu_win[-1] + c * unit)
        for _ in range(t):
            cu_frame.append(cu_frame[-1] + h * w)
        img_start.append(img_start[-1] + t * h * w)
        # 2-D rotary positions (row, col) in merge-unit order, shifted by O_j along the diagonal
        g = image_to_query[i]
        o = offset_in_group.get(g, 0)
        offset_in_group[g] = o + max(h, w)
        rows = torch.arange(h).view(lh, m, 1, 1).expand(lh, m, lw, m).permute(0, 2, 1, 3).flatten()
        cols = torch.arange(w).view(1, 1, lw, m).expand(lh, m, lw, m).permute(0, 2, 1, 3).flatten()
        pos.append((torch.stack([rows, cols], -1) + o).repeat(t, 1))
    window_index = torch.cat(window_index)
    N = img_start[-1]
    pos = torch.cat(pos).view(N // unit, unit, 2)[window_index].view(N, 2)
    head_dim = cfg.hidden_size // cfg.num_heads
    cos, sin = rotary_cos_sin(pos.to(device), head_dim, cfg.rope_theta)

    # Text slot s of group g sits at (P+s, P+s), P = sum of max(h, w) over the group's images.
    tpos = tcos = tsin = None
    if toff[-1] > 0:
        tpos = torch.cat([torch.arange(text_lens[g]) + offset_in_group.get(g, 0) for g in range(len(text_lens))])
        tcos, tsin = rotary_cos_sin(tpos[:, None].expand(-1, 2).to(device), head_dim, cfg.rope_theta)

    cu_group = [0] + [img_start[end] for _, _, end in runs]
    tcu = [(toff[g], toff[g + 1]) for g, _, _ in runs]
    window_index = window_index.to(device)
    return Layout(
        pos=pos, tpos=tpos, window_index=window_index,
        reverse=torch.argsort(window_index),
        cos=cos, sin=sin, tcos=tcos, tsin=tsin,
        windows=make_segments(cu_win, device=device),
        frames=make_segments(cu_frame, device=device),
        groups=make_segments(cu_group, tcu, device=device),
    )


# -----------------------------------------------------------------------------
# Vision tower


class VisionAttention(nn.Module):
    def __init__(self, cfg, query_aware):
        super().__init__()
        dim = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_heads, dim // cfg.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        if query_aware:
            # ViLaVT: the inquiry enters as extra keys/values (release behaviour; see module docstring)
            self.instruct_key_proj = nn.Linear(dim, dim, bias=True)
            self.instruct_value_proj = nn.Linear(dim, dim, bias=True)
        self.query_aware = query_aware

    def forward(self, x, lay, seg, text=None):
        # x: (N, C) window-ordered image tokens; text: (n_text, C) projected inquiry tokens
        N, H, D = x.shape[0], self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(N, 3, H, D).unbind(1)
        q, k = rotate_fp32(q, lay.cos, lay.sin), rotate_fp32(k, lay.cos, lay.sin)
        tk = tv = None
        if self.query_aware and text is not None and text.shape[0] > 0:
            tk = rotate_fp32(self.instruct_key_proj(text).view(-1, H, D), lay.tcos, lay.tsin)
            tv = self.instruct_value_proj(text).view(-1, H, D)  # values get no rotary
        return self.proj(segment_attention(q, k, v, seg, tk, tv))


def explicit_attention(attn, x, lay, seg, text, with_output=False, chunk_elems=2 ** 27):
    """One vision layer's attention written out: softmax(q k^T / sqrt(d)) per attention segment
    (window, image or query group), keys = [the segment's image tokens ; its inquiry keys], the
    same inputs as VisionAttention.forward (the SDPA path it mirrors, for eval.py --attn-map). Returns (attention each image token
    receives, mean over heads, summed over queries: (N,); and with_output the layer's output,
    which tests compare with the SDPA path). Queries go in chunks so the (heads, rows, keys)
    matrix stays near chunk_elems floats even for a 32k-patch image."""
    N, H, D = x.shape[0], attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(N, 3, H, D).unbind(1)
    q, k = rotate_fp32(q, lay.cos, lay.sin).float(), rotate_fp32(k, lay.cos, lay.sin).float()
    tk = tv = None
    if attn.query_aware and text is not None and text.shape[0] > 0:
        tk = rotate_fp32(attn.instruct_key_proj(text).view(-1, H, D), lay.tcos, lay.tsin).float()
        tv = attn.instruct_value_proj(text).view(-1, H, D)
    received = torch.zeros(N, device=x.device)
    out = torch.zeros(N, H, D, device=x.device) if with_output else None
    for s in range(len(seg.cu) - 1):
        a, b = seg.cu[s], seg.cu[s + 1]
        ta, tb = seg.tcu[s]
        keys, vals = k[a:b], v[a:b]
        if tk is not None and tb > ta:
            keys, vals = torch.cat([keys, tk[ta:tb]]), torch.cat([vals, tv[ta:tb]])
        keys, vals = keys.transpose(0, 1), vals.float().transpose(0, 1)  # (H, Lk, D)
        rows = max(1, chunk_elems // (H * keys.shape[1]))
        for r in range(a, b, rows):
            e = min(b, r + rows)
            w = (q[r:e].transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(D)).softmax(-1)  # (H, rows, Lk)
            received[a:b] += w[:, :, :b - a].mean(0).sum(0)
            if with_output:
                out[r:e] = (w @ vals).transpose(0, 1)
    if with_output:
        out = attn.proj(out.reshape(N, H * D).to(x.dtype))
    return received, out


class VisionBlock(nn.Module):
    def __init__(self, cfg, query_aware):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg, query_aware)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, lay, seg, text=None):
        x = x + self.attn(self.norm1(x), lay, seg, text)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Kept as a Conv3d so the checkpoint key/shape match; kernel == stride, so it is a
        # linear map of the flattened 1176-value patch row, which is how we apply it.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x):
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden_size))

    def forward(self, x):
        # group each 2x2 merge unit (4 consecutive tokens) into one 5120-vector
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionEncoder(nn.Module):
    """Checkpoint prefix `visual.`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg, i in cfg.query_layers) for i in range(cfg.depth)])
        self.merger = PatchMerger(cfg)
        self.checkpointing = False  # activation checkpointing per block (sft.py sets it)

    def layer_kind(self, i):
        if i in self.cfg.query_layers:
            return "group"
        return "frame" if i in self.cfg.fullatt_block_indexes else "window"

    def forward(self, pixel_values, grid_thw, text=None, text_lens=None, image_to_query=None):
        """pixel_values: (N, 1176) patch rows of all images in order; grid_thw: (n_img, 3).
        text: (sum(text_lens), C) projected inquiry tokens, groups in id order.
        Returns (N/4, out_hidden_size) features in the images' own (row-major merge) order."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        N = pixel_values.shape[0]
        assert pixel_values.dim() == 2, f"pixel_values must be (N, patch_dim), got {tuple(pixel_values.shape)}"
        assert N == int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum()), \
            f"pixel_values has {N} rows but grid_thw {grid_thw.tolist()} implies another count"
        lay = make_layout(cfg, grid_thw, text_lens, image_to_query, pixel_values.device)
        x = self.patch_embed(pixel_values)  # (N, C)
        x = x.view(N // unit, unit, -1)[lay.window_index].view(N, -1)
        for i, blk in enumerate(self.blocks):
            kind = self.layer_kind(i)
            seg = {"window": lay.windows, "frame": lay.frames, "group": lay.groups}[kind]
            t = text if kind == "group" else None
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, lay, seg, t, use_reentrant=False)
            else:
                x = blk(x, lay, seg, t)
        return self.merger(x)[lay.reverse]


# -----------------------------------------------------------------------------
# Inquiry text encoder (Qwen3; checkpoint prefix `text_encoder.`)


class InquiryEncoder(nn.Module):
    def __init__(self, cfg: InquiryConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([
            DecoderBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.rms_norm_eps, qkv_bias=False, qk_norm=True)
            for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, ids, mask):
        """ids, mask: (B, T), RIGHT padded (SPEC 2). Returns last_hidden_state (B, T, C) after the
        final norm. Causal attention with right padding means valid tokens never see the pads,
        so valid outputs do not depend on the padding; pad positions hold garbage."""
        assert ids.shape == mask.shape, f"query_ids {tuple(ids.shape)} vs query_mask {tuple(mask.shape)}"
        lens = mask.long().sum(1)
        right = torch.arange(ids.shape[1], device=ids.device)[None] < lens[:, None]
        assert torch.equal(right, mask.bool()), "query_mask must be right padded (1...1 0...0 per row)"
        x = self.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)
        freqs = pos[:, None].float() * rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, ids.device)
        emb = torch.cat((freqs, freqs), -1)[None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)
