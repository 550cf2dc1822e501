"""
Transformer building blocks shared by the language model (model.py) and the inquiry text
encoder (encoder.py): RMSNorm, the SwiGLU MLP, rotary helpers and one decoder block.

This is its own file only so that model.py can import encoder.py without an import cycle;
both Qwen2.5 (the LM) and Qwen3 (the inquiry encoder) are the same block with two switches
(q/k/v bias for Qwen2.5, per-head q/k RMSNorm for Qwen3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Qwen's RMSNorm: normalise in fp32, cast back, then scale (the order matters for bf16 parity)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The vision tower uses biases, the LMs do not."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (..., D); cos/sin broadcastable to x. Computed in x's dtype, as transformers does for the LMs."""
    return x * cos + rotate_half(x) * sin


def rope_inv_freq(head_dim, theta, device=None):
    # Same expression as transformers' default rope init, so cos/sin are bit-identical.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def init_linear_(module, std):
    """N(0, std) weights, zero biases: ViLaVT.init_weights' rule for every Linear and Conv (and
    from_pretrained gives ViLaVT's new layers the same N(0, 0.02) / zero)."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Causal GQA self-attention through SDPA, with an optional static KV cache."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, qkv_bias, qk_norm, eps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        # Qwen3 normalises q and k per head before the rotary (Qwen2.5 does not).
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x, cos, sin, cache=None, cache_pos=None, mask=None):
        # x: (B, T, C); cos/sin: (B, T, D); cache: a LayerCache; cache_pos: (B,) first slot per row;
        # mask: (B, 1, T, end) bool over the cache slots, or None for a prefill of every row from slot 0
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None and mask is None:
            # a prefill into an empty cache (every row from slot 0): write it, attend as without one
            cache.update(cache_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        elif cache is not None:
            k, v = cache.update(cache_pos, k, v)  # (B, Hkv, S, D): everything written so far
            # GQA with a mask: fold each kv head's query heads into the query axis instead of
            # enable_gqa, which with an explicit mask falls back to the math kernel on CUDA and
            # materialises the kv heads n_rep times. Heads h of kv head j are j*n_rep .. j*n_rep+n_rep-1.
            rep = self.n_heads // self.n_kv_heads
            qf = q.reshape(B, self.n_kv_heads, rep * T, self.head_dim)
            m = mask.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(B, 1, rep * T, -1)
            y = F.scaled_dot_product_attention(qf, k, v, attn_mask=m).view(B, self.n_heads, T, self.head_dim)
        else:
            # No cache: one causal pass. Right padding needs no mask under causality.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). Key names follow the HF checkpoints."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, hidden, eps, qkv_bias, qk_norm):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim, qkv_bias, qk_norm, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden, bias=False)

    def forward(self, x, cos, sin, cache=None, cache_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
