"""
ViLaVT in plain PyTorch: the Qwen2.5-VL language model with M-RoPE, the dynamic vision
encoder (encoder.py), a static KV cache, and loading/saving of real HF checkpoint folders.

    python model.py --config ../shared/fixtures/configs/qwen2_5_vl_7b_instruct.config.json \
        [--embedder-config ../shared/fixtures/configs/qwen3_embedding_0_6b.config.json]

builds the model on the meta device and prints its parameter counts.

State-dict keys are the checkpoints' own (SPEC 1-2): `model.embed_tokens`, `model.layers.{i}`,
`model.norm`, `lm_head`, `visual.*`, and for ViLaVT `text_encoder.*`, `text_proj.*`.
"""

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from encoder import InquiryConfig, InquiryEncoder, VisionConfig, VisionEncoder
from layers import DecoderBlock, RMSNorm, init_linear_, rope_inv_freq


@dataclass
class LMConfig:  # the Qwen2.5 decoder; defaults are Qwen2.5-VL-7B
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28  # head dim 128
    num_key_value_heads: int = 4  # GQA
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple = (16, 24, 24)  # rotary frequencies for (temporal, height, width)
    tie_word_embeddings: bool = False  # 7B: untied lm_head
    image_token_id: int = 151655  # <|image_pad|>: replaced by image features
    initializer_range: float = 0.02


@dataclass
class ViLaVTConfig:
    lm: LMConfig
    vision: VisionConfig
    inquiry: InquiryConfig | None = None  # None: vanilla Qwen2.5-VL (no inquiry path)
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read; save writes it back updated


# Query-aware layer sets of the release's `integration_point` values (SPEC 2): fixed indices,
# not fractions of the depth.
INTEGRATION_POINTS = {
    "all": lambda depth, full: list(range(depth)),
    "early": lambda depth, full: [i for i in range(depth) if i < 16],
    "late": lambda depth, full: [i for i in range(depth) if i >= 16],
    "late2": lambda depth, full: [i for i in range(depth) if i >= 24],
    "late3": lambda depth, full: [i for i in range(depth) if i >= 8],
    "sparse": lambda depth, full: list(full),
}




def tiny_config(vocab_size, image_token_id, vanilla=False):
    """The CPU-sized ViLaVT of the embedded default (`python sft.py`): the 7B's structure in
    miniature. Vision depth 8 with the release's schedule scaled down: window layers 0-2,
    per-image full layer 3, query-aware layers 4-7 (7B: 0-14 / 7, 15 / 16-31).
    vanilla=True: the stock Qwen2.5-VL counterpart (the paper's "w/ vanilla ViT"), no inquiry
    path; its layers 4-7 are what stock Qwen2.5-VL has there: window layers and a per-image
    full layer 7 (7B: full layers 7, 15, 23, 31)."""
    lm = LMConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6), image_token_id=image_token_id)
    vision = VisionConfig(depth=8, hidden_size=64, intermediate_size=172, num_heads=4, out_hidden_size=128,
                          fullatt_block_indexes=(3, 7) if vanilla else (3,),
                          query_layers=() if vanilla else (4, 5, 6, 7), text_dim=64)
    inquiry = InquiryConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    raw = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
           "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
           "num_hidden_layers": lm.num_hidden_layers, "num_attention_heads": lm.num_attention_heads,
           "num_key_value_heads": lm.num_key_value_heads, "vocab_size": vocab_size, "rms_norm_eps": lm.rms_norm_eps,
           "rope_theta": lm.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(lm.mrope_section)},
           "tie_word_embeddings": False, "image_token_id": image_token_id, "hidden_act": "silu",
           "vision_config": {"depth": vision.depth, "hidden_size": vision.hidden_size,
                             "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads,
                             "out_hidden_size": vision.out_hidden_size, "patch_size": 14, "spatial_merge_size": 2,
                             "temporal_patch_size": 2, "window_size": 112, "in_channels": 3,
                             "fullatt_block_indexes": list(vision.fullatt_block_indexes), "hidden_act": "silu"}}
    inquiry.raw = {"model_type": "qwen3", "architectures": ["Qwen3Model"], "vocab_size": vocab_size,
                   "hidden_size": inquiry.hidden_size, "intermediate_size": inquiry.intermediate_size,
                   "num_hidden_layers": inquiry.num_hidden_layers, "num_attention_heads": inquiry.num_attention_heads,
                   "num_key_value_heads": inquiry.num_key_value_heads, "head_dim": inquiry.head_dim,
                   "rms_norm_eps": inquiry.rms_norm_eps, "rope_theta": inquiry.rope_theta, "hidden_act": "silu",
                   "tie_word_embeddings": True}
    return ViLaVTConfig(lm=lm, vision=vision, inquiry=None if vanilla else inquiry, raw=raw)


# -----------------------------------------------------------------------------
# Config files


def _get(d, key, where, default=...):
    if key in d:
        return d[key]
    if default is ...:
        raise ValueError(f"{where}: missing field '{key}'")
    return default


def _int(d, key, where, default=...):
    v = _get(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: field '{key}' must be an integer, got {v!r}")
    return v


def _rope(d, t, where):
    """(rope_theta, mrope_section or None): transformers 4.x writes rope_scaling {type, mrope_section}
    and a top-level rope_theta, 5.x rope_parameters {rope_type, mrope_section, rope_theta}. Both
    are read; saving writes back the layout the checkpoint came in (cfg.raw)."""
    rp = t.get("rope_parameters") or d.get("rope_parameters") or {}
    rs = t.get("rope_scaling") or d.get("rope_scaling") or {}
    theta = t.get("rope_theta", d.get("rope_theta", rp.get("rope_theta", 1e6)))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{where}: field 'rope_theta' must be a number, got {theta!r}")
    return float(theta), rp.get("mrope_section", rs.get("mrope_section"))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def inquiry_config_from_hf(d, where):
    if d.get("model_type") not in ("qwen3", None):
        raise ValueError(f"{where}: inquiry encoder must be a qwen3 model, got model_type={d.get('model_type')!r}")
    hidden, heads = _int(d, "hidden_size", where), _int(d, "num_attention_heads", where)
    return InquiryConfig(
        vocab_size=_int(d, "vocab_size", where), hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size", where),
        num_hidden_layers=_int(d, "num_hidden_layers", where), num_attention_heads=heads,
        num_key_value_heads=_int(d, "num_key_value_heads", where, heads),
        head_dim=_int(d, "head_dim", where, hidden // heads),
        rms_norm_eps=_get(d, "rms_norm_eps", where, 1e-6), rope_theta=_rope(d, d, where)[0],
        max_tokens=int(d.get("max_query_tokens", 50)), raw=dict(d))


def config_from_hf(d, embedder=None, where="config.json"):
    """A Qwen2.5-VL config.json (flat, or nested text_config/vision_config) or a ViLaVT one.

    - model_type "vilavt": the release's layout; query-aware layers from our explicit
      `vision_config.query_aware_layers` if present, else from `integration_point`.
    - model_type "qwen2_5_vl" alone: the vanilla model (stock schedule, no inquiry path).
    - "qwen2_5_vl" plus an embedder config: ViLaVT built from the two stock checkpoints,
      with the release's schedule scaled to the depth (7B: full layers [7, 15], query-aware >= 16).
    """
    mt = d.get("model_type")
    if mt not in ("qwen2_5_vl", "vilavt"):
        raise ValueError(f"{where}: model_type must be 'qwen2_5_vl' or 'vilavt', got {mt!r}")
    t = d.get("text_config") or d  # newer transformers nest the LM fields
    theta, section = _rope(d, t, where)
    if section is None:
        raise ValueError(f"{where}: rope_scaling.mrope_section (or rope_parameters.mrope_section) missing "
                         "(not a Qwen2.5-VL config?)")
    heads = _int(t, "num_attention_heads", where)
    lm = LMConfig(
        vocab_size=_int(t, "vocab_size", where), hidden_size=_int(t, "hidden_size", where),
        intermediate_size=_int(t, "intermediate_size", where), num_hidden_layers=_int(t, "num_hidden_layers", where),
        num_attention_heads=heads, num_key_value_heads=_int(t, "num_key_value_heads", where, heads),
        rms_norm_eps=_get(t, "rms_norm_eps", where, 1e-6), rope_theta=theta,
        mrope_section=tuple(section),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        image_token_id=_int(d, "image_token_id", where, t.get("image_token_id", 151655)),
        initializer_range=t.get("initializer_range", 0.02))
    v = _get(d, "vision_config", where)
    vw = where + ":vision_config"
    full = list(_get(v, "fullatt_block_indexes", vw))
    depth = _int(v, "depth", vw)
    inquiry = None
    if mt == "vilavt":
        inquiry = inquiry_config_from_hf(_get(d, "text_encoder_config", where), where + ":text_encoder_config")
        if "query_aware_layers" in v:
            query = list(v["query_aware_layers"])
        else:
            ip = _get(v, "integration_point", vw)
            if ip not in INTEGRATION_POINTS:
                raise ValueError(f"{vw}: unknown integration_point {ip!r} (one of {sorted(INTEGRATION_POINTS)})")
            query = INTEGRATION_POINTS[ip](depth, full)
    elif embedder is not None:  # the release's schedule for any stock schedule: the first half of the stock
        # full layers (rounded up) kept, every layer after them query-aware. 7B: stock [7, 15, 23, 31] -> full
        # [7, 15], query-aware 16-31, as released; the demo's tower: stock [3, 7] -> full [3], query-aware 4-7,
        # model.tiny_config's ViLaVT
        inquiry = inquiry_config_from_hf(embedder, "embedder config.json")
        if not full:
            raise ValueError(f"{vw}: fullatt_block_indexes is empty: no stock schedule to build ViLaVT's from")
        full = sorted(full)[:(len(full) + 1) // 2]
        query = list(range(full[-1] + 1, depth))
    else:
        query = []
    if any(not 0 <= i < depth for i in query + full):
        raise ValueError(f"{vw}: layer index out of range for depth {depth}: full {full}, query-aware {query}")
    vision = VisionConfig(
        depth=depth, hidden_size=_int(v, "hidden_size", vw), intermediate_size=_int(v, "intermediate_size", vw),
        num_heads=_int(v, "num_heads", vw), out_hidden_size=_int(v, "out_hidden_size", vw, lm.hidden_size),
        in_channels=v.get("in_channels", v.get("in_chans", 3)), patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
        window_size=v.get("window_size", 112), fullatt_block_indexes=tuple(full), query_layers=tuple(query),
        text_dim=inquiry.hidden_size if inquiry else 1024, initializer_range=v.get("initializer_range", 0.02))
    if vision.out_hidden_size != lm.hidden_size:
        raise ValueError(f"{vw}: out_hidden_size {vision.out_hidden_size} != LM hidden_size {lm.hidden_size}")
    return ViLaVTConfig(lm=lm, vision=vision, inquiry=inquiry, raw=dict(d))


def config_to_hf(cfg):
    """config.json to save: the loaded Qwen2.5-VL dict, plus the release's ViLaVT fields."""
    d = json.loads(json.dumps(cfg.raw))
    v = d.setdefault("vision_config", {})
    v["fullatt_block_indexes"] = list(cfg.vision.fullatt_block_indexes)
    if cfg.inquiry is None:
        return d
    d["model_type"] = "vilavt"
    d["architectures"] = ["Qwen2_5_VLForConditionalGeneration_Vilavt"]
    d["text_encoder_config"] = cfg.inquiry.raw or {k: v for k, v in asdict(cfg.inquiry).items() if k != "raw"}
    q = list(cfg.vision.query_layers)
    depth = cfg.vision.depth
    # integration_point keeps the release's field readable by the release; ours is explicit too.
    v["integration_point"] = next((k for k, f in INTEGRATION_POINTS.items()
                                   if f(depth, cfg.vision.fullatt_block_indexes) == q), "custom")
    v["query_aware_layers"] = q
    return d


# -----------------------------------------------------------------------------
# KV cache (static, preallocated; gpt-fast style)


class LayerCache:
    def __init__(self, k, v):
        self.k, self.v = k, v  # (B, Hkv, max_len, D)
        self.end = 0  # slots [0, end) are returned to attention; set by the model per forward

    def update(self, pos, k, v):
        # pos: (B,) first slot of each row; k, v: (B, Hkv, S, D). Rows may sit at different lengths.
        B, _, S, _ = k.shape
        idx = pos[:, None] + torch.arange(S, device=pos.device)  # (B, S)
        rows = torch.arange(B, device=pos.device)[:, None]
        self.k[rows, :, idx] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, idx] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:, :, :self.end], self.v[:, :, :self.end]


class KVCache:
    """One LayerCache per decoder layer. Row r of every layer belongs to sequence r."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = [LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.max_len = max_len

    @property
    def batch(self):
        return self.layers[0].k.shape[0]

    def view_rows(self, start, end):
        """A cache over rows start:end that shares storage (prefill one prompt in place)."""
        view = KVCache.__new__(KVCache)
        view.layers = [LayerCache(c.k[start:end], c.v[start:end]) for c in self.layers]
        view.max_len = self.max_len
        return view

    def copy_rows(self, src, dst, n=None):
        """Copy the cache of rows `src` into rows `dst` (e.g. one prefill to its G samples).
        n: copy only slots [0, n), the ones written so far (default: all)."""
        n = self.max_len if n is None else n
        for c in self.layers:
            c.k[dst, :, :n] = c.k[src, :, :n]
            c.v[dst, :, :n] = c.v[src, :, :n]

    def select_rows(self, idx, n=None):
        """Keep only rows `idx` (in that order): finished rows stop costing compute.
        n: slots [0, n) hold data (default: all); the rest of the new rows is zero."""
        self._reallocate(idx, self.max_len, n)

    def grow(self, max_len, n=None):
        """Room for max_len slots per row, the n written ones copied (default: all): the rollout
        sizes its cache by use, not by its longest possible trajectory."""
        self._reallocate(slice(None), max_len, n)

    def _reallocate(self, rows, max_len, n):
        n = self.max_len if n is None else n
        for c in self.layers:
            for name in ("k", "v"):
                written = getattr(c, name)[rows, :, :n]  # copies the written slots only
                new = written.new_zeros(written.shape[:2] + (max_len,) + written.shape[3:])
                new[:, :, :n] = written
                setattr(c, name, new)
        self.max_len = max_len


# -----------------------------------------------------------------------------
# M-RoPE (SPEC 1; transformers' get_rope_index)


def rope_index(input_ids, grid_thw, image_token_id, merge=2):
    """3-D positions (3, B, T) and each row's next text position (B,).

    Text tokens get (p, p, p). An image block of merged grid (h, w) starting at position o gets
    (o, o + row, o + col); the text after it starts at o + max(h, w). Images are consumed from
    grid_thw in order, row by row (row 0's images first), exactly like transformers.
    """
    B, T = input_ids.shape
    device = input_ids.device
    pos = torch.arange(T, device=device).expand(3, B, T).clone()
    next_pos = torch.empty(B, dtype=torch.long, device=device)
    grids = [] if grid_thw is None else grid_thw.tolist()
    img = 0
    for b in range(B):
        where = (input_ids[b] == image_token_id).nonzero().flatten().tolist()
        shift, k = 0, 0  # shift: how far text positions lag token indices so far
        while k < len(where):
            assert img < len(grids), f"row {b}: more <|image_pad|> runs than images in grid_thw ({len(grids)})"
            t, h, w = grids[img]
            h, w = h // merge, w // merge
            n = t * h * w
            s = where[k]
            assert k + n <= len(where) and where[k + n - 1] == s + n - 1, \
                f"row {b}: image {img} needs {n} consecutive <|image_pad|> tokens at index {s}"
            o = s + shift
            r = torch.arange(h, device=device).view(1, h, 1).expand(t, h, w).flatten()
            c = torch.arange(w, device=device).view(1, 1, w).expand(t, h, w).flatten()
            pos[0, b, s:s + n] = o
            pos[1, b, s:s + n] = o + r
            pos[2, b, s:s + n] = o + c
            shift += max(h, w) - n
            pos[:, b, s + n:] += max(h, w) - n
            img += 1
            k += n
        next_pos[b] = pos[:, b].max() + 1 if T else 0
    assert img == len(grids), f"grid_thw has {len(grids)} images but input_ids hold {img} <|image_pad|> runs"
    return pos, next_pos


def mrope_cos_sin(position_ids, head_dim, theta, section, dtype):
    # position_ids: (3, B, T) -> cos/sin (B, T, head_dim). Frequency band j rotates by the
    # temporal, height or width position according to mrope_section (e.g. 16/24/24).
    inv = rope_inv_freq(head_dim, theta, position_ids.device)
    freqs = position_ids[..., None].float() * inv  # (3, B, T, D/2)
    bands, s = [], 0
    for axis, n in enumerate(section):
        bands.append(freqs[axis, ..., s:s + n])
        s += n
    assert s == head_dim // 2, f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}"
    freqs = torch.cat(bands, -1)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# -----------------------------------------------------------------------------
# The model


class LM(nn.Module):
    """The Qwen2.5 decoder stack (checkpoint prefix `model.`)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.layers = nn.ModuleList([
            DecoderBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                         cfg.intermediate_size, cfg.rms_norm_eps, qkv_bias=True, qk_norm=False)
            for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ViLaVT(nn.Module):
    def __init__(self, cfg: ViLaVTConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LM(cfg.lm)
        self.lm_head = nn.Linear(cfg.lm.hidden_size, cfg.lm.vocab_size, bias=False)
        if cfg.lm.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.visual = VisionEncoder(cfg.vision)
        if cfg.inquiry is not None:
            self.text_encoder = InquiryEncoder(cfg.inquiry)
            # one projection shared by all query-aware layers (SPEC 2)
            self.text_proj = nn.Linear(cfg.inquiry.hidden_size, cfg.vision.hidden_size, bias=True)
        self.checkpointing = False  # activation checkpointing of decoder blocks (sft.py sets it)

    @property
    def is_vilavt(self):
        return self.cfg.inquiry is not None

    def init_weights(self):
        """Every init choice in one place. Random models (tests, benchmarks) use all of it; a
        stock checkpoint turned into ViLaVT uses it for the new layers only (SPEC 2):
        Linear/Conv/Embedding weights N(0, 0.02), biases 0, norms 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                init_linear_(m, self.cfg.lm.initializer_range)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.cfg.lm.initializer_range)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def new_layer_names(self):
        """Parameters ViLaVT adds over stock Qwen2.5-VL (excluding the loaded text encoder)."""
        return [n for n, _ in self.named_parameters() if n.startswith("text_proj.") or ".instruct_" in n]

    # ---- vision

    def encode_images(self, pixel_values, grid_thw, query_ids=None, query_mask=None, image_to_query=None,
                      image_index=None):
        """Features (n_tokens, hidden) for all images, in order.

        query_ids/query_mask: (n_groups, L) right-padded inquiry tokens, row g for group g;
        image_to_query: (n_images,) group of each image (None: each image alone, no inquiry).
        The vanilla model has no inquiry path and ignores the inquiry (that is the ablation).
        image_index: (n_uses,) the images are encoded once each and their features returned in
        this order, one image per use (data.unique_groups: a prompt's G rollouts share originals)."""
        text = text_lens = None
        if self.is_vilavt and query_ids is not None:
            assert query_mask is not None, "query_ids given without query_mask"
            lens = query_mask.long().sum(1)
            text_lens = lens.tolist()
            rows = (lens > 0).nonzero().flatten()
            if len(rows):  # empty inquiries contribute zero text tokens (SPEC 2)
                L = int(lens.max())
                h = self.text_encoder(query_ids[rows, :L], query_mask[rows, :L])  # Eq. 3: h_q = V_m(q), (R, L, 1024)
                h = h[query_mask[rows, :L].bool()]  # valid tokens, groups in id order
                text = self.text_proj(h.to(self.text_proj.weight.dtype))
        feats = self.visual(pixel_values, grid_thw, text, text_lens, image_to_query)
        if image_index is not None:  # each use gets its image's features (the gradient sums over uses)
            parts = feats.split((grid_thw.prod(-1) // self.cfg.vision.spatial_merge_size ** 2).tolist())
            feats = torch.cat([parts[i] for i in image_index.tolist()])
        return feats

    # ---- language model

    def hidden_states(self, input_ids, pixel_values=None, grid_thw=None, query_ids=None, query_mask=None,
                      image_to_query=None, image_index=None, *, image_embeds=None, position_ids=None, cache=None,
                      cache_pos=None):
        """Final-norm hidden states (B, T, C). See forward."""
        cfg = self.cfg.lm
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            assert image_embeds is None, "pass pixel_values or image_embeds, not both"
            image_embeds = self.encode_images(pixel_values, grid_thw, query_ids, query_mask, image_to_query, image_index)
            if image_index is not None:
                grid_thw = grid_thw[image_index]  # one row per image use, for the positions
        if image_embeds is not None:
            is_img = input_ids == cfg.image_token_id
            n_img = int(is_img.sum())
            assert image_embeds.shape[0] == n_img, f"{n_img} <|image_pad|> tokens but {image_embeds.shape[0]} image features"
            x = x.masked_scatter(is_img[..., None], image_embeds.to(x.dtype))
        # (no images: a stray <|image_pad|> fails in rope_index below; decode steps pass
        # position_ids and skip that host sync, the rollout never samples image tokens)
        if position_ids is None:
            assert cache_pos is None or int(cache_pos.max()) == 0, "decoding from a cache needs position_ids"
            position_ids, _ = rope_index(input_ids, grid_thw, cfg.image_token_id, self.cfg.vision.spatial_merge_size)
        cos, sin = mrope_cos_sin(position_ids, cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta,
                                 cfg.mrope_section, x.dtype)
        mask = None
        if cache is not None:
            # row b's query i sits at slot cache_pos[b] + i and sees slots <= that; a prefill of
            # every row from slot 0 is plain causal attention (mask None: SDPA's causal kernel)
            start = int(cache_pos.max())
            end = start + T
            assert end <= cache.max_len, f"KV cache overflow: need {end} slots, have {cache.max_len}"
            for c in cache.layers:
                c.end = end
            if start > 0:
                q_slot = cache_pos[:, None] + torch.arange(T, device=x.device)  # (B, T)
                mask = (torch.arange(end, device=x.device)[None, None, :] <= q_slot[:, :, None])[:, None]  # (B,1,T,end)
        for i, layer in enumerate(self.model.layers):
            c = None if cache is None else cache.layers[i]
            if self.checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, c, cache_pos, mask)
        return self.model.norm(x)

    def forward(self, input_ids, pixel_values=None, grid_thw=None, query_ids=None, query_mask=None,
                image_to_query=None, **kw):
        """Logits (B, T, vocab).

        input_ids: (B, T), right padded if B > 1 (causal attention makes right padding inert).
        pixel_values: (N, 1176) patch rows of all images (originals and crops) in order of
        appearance, row 0's first; grid_thw: (n_images, 3) long. query_ids/query_mask:
        (n_groups, L); image_to_query: (n_images,). Position ids are computed here from
        input_ids and grid_thw unless given (decoding from a cache gives them).
        Keywords: image_embeds (precomputed features), position_ids (3, B, T), cache (KVCache)
        with cache_pos (B,) the first cache slot of each row.
        """
        return self.lm_head(self.hidden_states(input_ids, pixel_values, grid_thw, query_ids, query_mask,
                                               image_to_query, **kw))

    def token_logprobs(self, hidden, targets, chunk=1024, entropy=False, temperature=1.0):
        """log p(target) at every position (B, T) from hidden states (B, T, C), in fp32
        (targets < 0 give 0), p = softmax(logits / temperature); with entropy=True also the
        entropy of each position's distribution (B, T). The lm_head runs chunk by chunk (under
        activation checkpointing when training), so the (T x vocab) fp32 logits of a 24k-token
        sample never exist at once."""
        def piece(h, t):
            logp = (self.lm_head(h).float() / temperature).log_softmax(-1)
            lp = torch.gather(logp, -1, t.clamp(min=0)[..., None])[..., 0] * (t >= 0)
            if not entropy:
                return lp
            with torch.no_grad():  # a statistic: a graph here would keep two (tokens x vocab) tensors alive
                return lp, -(logp.exp() * logp).sum(-1)
        out = []
        for s in range(0, hidden.shape[1], chunk):
            h, t = hidden[:, s:s + chunk], targets[:, s:s + chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                out.append(torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False))
            else:
                out.append(piece(h, t))
        if entropy:
            return torch.cat([o[0] for o in out], 1), torch.cat([o[1] for o in out], 1)
        return torch.cat(out, 1)

    def new_cache(self, batch, max_len, dtype=None, device=None):
        cfg = self.cfg.lm
        w = self.lm_head.weight
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len,
                       cfg.hidden_size // cfg.num_attention_heads, dtype or w.dtype, device or w.device)

    # ---- checkpoints

    @classmethod
    def from_pretrained(cls, model_dir, embedder_dir=None, dtype=torch.float32, device="cpu"):
        """Load a local folder: stock Qwen2.5-VL (vanilla), stock + Qwen3-Embedding folder
        (ViLaVT with fresh new layers), or a ViLaVT checkpoint. Built on the meta device and
        filled shard by shard, so peak memory is about one model copy."""
        cfg_path = os.path.join(model_dir, "config.json")
        d = read_json(cfg_path)
        emb = read_json(os.path.join(embedder_dir, "config.json")) if embedder_dir else None
        if emb is not None and d.get("model_type") == "vilavt":
            raise ValueError(f"{cfg_path}: already a ViLaVT checkpoint with its own text encoder; drop embedder_dir")
        cfg = config_from_hf(d, emb, cfg_path)
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.to(dtype)
        expected = dict(model.state_dict())
        if cfg.lm.tie_word_embeddings:
            expected.pop("lm_head.weight")
        fresh = set()
        if emb is not None:  # stock + embedder: new layers initialised here, text encoder from its folder
            fresh = set(model.new_layer_names())
            with torch.no_grad():
                for n in fresh:
                    p = model.get_parameter(n)
                    nn.init.normal_(p, std=0.02) if n.endswith("weight") else nn.init.zeros_(p)
        from_embedder = {k for k in expected if k.startswith("text_encoder.")} if emb is not None else set()
        loaded = load_safetensors_into(expected, model_dir, skip=fresh | from_embedder, rename=_stock_key)
        if emb is not None:
            loaded |= load_safetensors_into(expected, embedder_dir, only_prefix="text_encoder.",
                                            rename=lambda k: "text_encoder." + (k[6:] if k.startswith("model.") else k),
                                            ignore=lambda k: k.startswith("lm_head."))
        missing = sorted(set(expected) - loaded - fresh)
        if missing:
            raise ValueError(f"{model_dir}: checkpoint is missing {len(missing)} tensors: {_short(missing)}")
        return model.eval()

    def save_pretrained(self, out_dir, max_shard_bytes=5 * 2**30):
        """Write config.json + safetensors; see save_checkpoint."""
        return save_checkpoint({k: v.detach() for k, v in self.state_dict().items()}, self.cfg, out_dir, max_shard_bytes)


def save_checkpoint(state_dict, cfg, out_dir, max_shard_bytes=5 * 2**30):
    """Write config.json + safetensors (sharded with an index when large), each file
    atomically (temp file + rename). Keys are the release's, so the stock part loads in
    transformers and a ViLaVT folder loads back here bit-exactly. Takes a plain (full)
    state dict so FSDP training can save what rank 0 gathered."""
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.contiguous().cpu() for k, v in state_dict.items()}
    if cfg.lm.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = sd[k]
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(os.path.join(out_dir, "model.safetensors"), lambda p: save_file(shards[0], p, metadata=meta))
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            atomic_write(os.path.join(out_dir, name), lambda p, s=shard: save_file(s, p, metadata=meta))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        atomic_write(os.path.join(out_dir, "model.safetensors.index.json"), json.dumps(index, indent=2))
    d = config_to_hf(cfg)
    d["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    atomic_write(os.path.join(out_dir, "config.json"), json.dumps(d, indent=2))
    # a stale single file or index next to a freshly sharded save would shadow it
    for stale in ({"model.safetensors.index.json"} if len(shards) == 1 else {"model.safetensors"}):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    return names


def _stock_key(k):
    # transformers >= 4.52 may hold the new module layout; map it to the checkpoint layout
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.visual."):
        return k[len("model."):]
    return k


def _short(keys, n=12):
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def atomic_write(path, content):
    """The project's one way to write a file that others read: into a temp file in the same
    folder, then renamed over `path`, so a reader (or a resumed run) never sees half a file.
    content: str, bytes, or a function that writes the temp path it is given."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def safetensors_files(folder):
    """The weight files of a folder: the shards of model.safetensors.index.json, else model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise ValueError(f"{index}: no weight_map")
        return [os.path.join(folder, f) for f in sorted(set(wm.values()))]
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


def load_safetensors_into(expected, folder, skip=(), only_prefix=None, rename=lambda k: k, ignore=lambda k: False):
    """Copy tensors from a folder's safetensors into `expected` (name -> parameter), one
    tensor at a time. Returns the names filled. Raises one error listing every unexpected or
    mis-shaped key; a truncated or corrupt file raises naming the file."""
    loaded, unexpected, bad_shape = set(), [], []
    for path in safetensors_files(folder):
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
        with f:
            for key in f.keys():
                name = rename(key)
                if ignore(key) or name in skip:
                    continue
                if name not in expected or (only_prefix and not name.startswith(only_prefix)):
                    unexpected.append(f"{key} ({os.path.basename(path)})")
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise ValueError(f"{path}: cannot read tensor {key} ({e}); the file may be truncated") from None
                p = expected[name]
                if tuple(t.shape) != tuple(p.shape):
                    bad_shape.append(f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}")
                    continue
                with torch.no_grad():
                    p.copy_(t)
                loaded.add(name)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_short(unexpected)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} mis-shaped tensors: {_short(bad_shape)}")
    if problems:
        raise ValueError(f"{folder}: " + "; ".join(problems))
    return loaded


# -----------------------------------------------------------------------------
# CLI: parameter counts of a config, built on the meta device


def count_params(model):
    n = lambda prefix: sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefix))
    new = sum(model.get_parameter(k).numel() for k in model.new_layer_names())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "vision": n("visual.") - sum(model.get_parameter(k).numel() for k in model.new_layer_names()
                                                          if k.startswith("visual.")),
            "lm": n("model.") + (0 if model.cfg.lm.tie_word_embeddings else n("lm_head.")),
            "text_encoder": n("text_encoder."), "new_layers": new}


def main():
    ap = argparse.ArgumentParser(description="Build ViLaVT from config.json on the meta device; print parameter counts.")
    ap.add_argument("--config", required=True, help="Qwen2.5-VL or ViLaVT config.json")
    ap.add_argument("--embedder-config", default=None, help="Qwen3-Embedding config.json (builds ViLaVT from stock)")
    args = ap.parse_args()
    d = read_json(args.config)
    emb = read_json(args.embedder_config) if args.embedder_config else None
    cfg = config_from_hf(d, emb, args.config)
    with torch.device("meta"):
        model = ViLaVT(cfg)
    c = count_params(model)
    kind = "ViLaVT" if model.is_vilavt else "vanilla Qwen2.5-VL"
    print(f"{kind}: vision full layers {list(cfg.vision.fullatt_block_indexes)}, query-aware {list(cfg.vision.query_layers)}")
    for k, label in [("total", "total"), ("vision", "vision tower (stock part)"), ("lm", "language model"),
                     ("text_encoder", "inquiry text encoder"), ("new_layers", "new layers (instruct k/v, text_proj)")]:
        print(f"{label:40s} {c[k]:>15,d}")
    print(f"{'bf16 weight memory':40s} {c['total'] * 2 / 2**30:>15.2f} GiB")


if __name__ == "__main__":
    main()
