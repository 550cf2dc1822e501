"""
Fixtures: tiny checkpoints in the real HF formats, written by transformers' own
save_pretrained into temp dirs, plus a tiny byte-level BPE tokenizer with Qwen's special
tokens (the zoom world's, zoom_world.build_tokenizer) and a small zoom world with every kind of
sample. Our loader reads the checkpoints through the same code path as a real 7B folder.
"""

import os
import sys

import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

import tiny_tokenizer  # noqa: E402
from bench import transformers_5  # noqa: E402 (the oracle's version switches live in bench.py, which calls it too)
import zoom_world as zw  # noqa: E402

SPECIALS = list(tiny_tokenizer.SPECIAL_TOKENS)

# Tiny but not trivial: GQA, explicit Qwen3 head_dim, uneven M-RoPE sections, and a vision
# depth of 18 so the release's schedule (full [7, 15], query-aware >= 16) exists at this size.
TINY_VISION = dict(depth=18, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[7, 15, 17], window_size=112, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3)
TINY_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The demo's tiny byte-level BPE (zoom_world.build_tokenizer): < 1024 tokens."""
    return zw.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


# every kind of sample (the demo's default is dots only, on a 2x2 grid, no crop of a crop)
# every kind of sample on a 3x3 grid (the demo's world is 2x2, one card per image): small cards, no ramp
ZW_CFG = zw.ZoomWorldConfig(mark_kinds=("dots", "digit"), grid=(3, 3), n_cards=(3, 6), share_crop_of_crop=0.25,
                            card_size=(64, 40), card_border=6, dot_size=8, dot_grid=(4, 2), ramp=0)


@pytest.fixture(scope="session")
def zoom_world(tmp_path_factory):
    return zw.make_world(str(tmp_path_factory.mktemp("zw")), n_train=40, n_eval=10, cfg=ZW_CFG, seed=3)


def tiny_qwen25vl_config(tok, **text_overrides):
    from transformers import Qwen2_5_VLConfig
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(TINY_TEXT, vocab_size=len(tok), **text_overrides)
    return Qwen2_5_VLConfig(vision_config=dict(TINY_VISION), text_config=text,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory, tokenizer):
    """A stock Qwen2.5-VL folder (nested config layout, as transformers 4.57 writes it)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("qwen25vl"))
    Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory, tokenizer):
    """A Qwen3-Embedding-style folder (a Qwen3Model: keys without the `model.` prefix)."""
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(1)
    d = str(tmp_path_factory.mktemp("qwen3emb"))
    Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **TINY_QWEN3)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# -----------------------------------------------------------------------------
# transformers as the oracle, under 4.57 and 5.x (requirements.txt; .ci/run runs the oracle tests
# under both). Where the two differ, these helpers pick the same oracle from either; where they
# disagree on what is right (alpha compositing, tests/test_preprocess.py), the test says so.

TRANSFORMERS_5 = transformers_5()


def hf_image_processor(**kw):
    """transformers' PIL image processor, pixels.py's oracle: Qwen2VLImageProcessor in 4.x; in
    5.x that name is the torchvision processor and the PIL one is Qwen2VLImageProcessorPil."""
    return (transformers.Qwen2VLImageProcessorPil if TRANSFORMERS_5 else transformers.Qwen2VLImageProcessor)(**kw)


def hf_smart_resize(*args):
    """The PIL processor's smart_resize: its module is image_processing_pil_qwen2_vl in 5.x
    (image_processing_qwen2_vl there is the torchvision processor's, and needs torchvision)."""
    if TRANSFORMERS_5:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    else:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize(*args)


@pytest.fixture(scope="session")
def token_ids(tokenizer):
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
