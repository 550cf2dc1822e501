"""Parity with transformers (the oracle), loading/saving, the KV cache and memory of the encoder."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import encoder
from model import ViLaVT, config_from_hf, config_to_hf, read_json, rope_index

from bench import hf_vision_features, mm_types
from conftest import SHARED



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # scoped: a module-level set_grad_enabled(False) would leak into other test files
        yield


def hf_vl(stock_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(stock_dir, dtype=torch.float32).eval()


def build_inputs(token_ids, vocab, segments, seed=0):
    """segments: list of ints (that many random text tokens) or (h, w) patch grids (an image block)."""
    g = torch.Generator().manual_seed(seed)
    ids, grids = [], []
    for s in segments:
        if isinstance(s, int):
            ids += torch.randint(len(token_ids), vocab, (s,), generator=g).tolist()
        else:
            h, w = s
            ids += [token_ids["<|vision_start|>"]] + [token_ids["<|image_pad|>"]] * (h * w // 4) + [token_ids["<|vision_end|>"]]
            grids.append([1, h, w])
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    n = sum(h * w for _, h, w in grids)
    pv = torch.randn(n, 1176, generator=g) if grids else None
    return torch.tensor([ids]), pv, grid


@pytest.fixture(scope="module")
def hf(stock_dir):
    return hf_vl(stock_dir)


@pytest.fixture(scope="module")
def vanilla(stock_dir):
    return ViLaVT.from_pretrained(stock_dir)


@pytest.fixture(scope="module")
def vilavt(stock_dir, embedder_dir):
    m = ViLaVT.from_pretrained(stock_dir, embedder_dir)
    # The real new layers start at N(0, 0.02); larger weights make every influence of the
    # inquiry and of cross-image attention plainly visible in the property tests.
    torch.manual_seed(0)
    with torch.no_grad():
        for n in m.new_layer_names():
            m.get_parameter(n).normal_(std=0.5)
    return m


# -----------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("segments", [
    [17],  # text only
    [5, (4, 6), 9],  # one image
    [3, (4, 6), 2, (8, 8), 4, (2, 10), 5],  # three images of different sizes, interleaved
    [2, (18, 20), 3],  # bigger than one 112-px window: several windows incl. ragged edges
], ids=["text", "1img", "3img", "windows"])
def test_logits_match_transformers(hf, vanilla, token_ids, tokenizer, segments):
    ids, pv, grid = build_inputs(token_ids, len(tokenizer), segments)
    ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, **mm_types(ids, token_ids["<|image_pad|>"])).logits
    ours = vanilla(ids, pv, grid)
    assert (ours - ref).abs().max() <= 1e-4


def test_batched_rows_match_transformers(hf, vanilla, token_ids, tokenizer):
    a, pa, ga = build_inputs(token_ids, len(tokenizer), [3, (4, 4), 6], seed=1)
    b, pb, gb = build_inputs(token_ids, len(tokenizer), [1, (2, 6), 1, (2, 2), 5], seed=2)
    assert a.shape == b.shape
    ids, pv, grid = torch.cat([a, b]), torch.cat([pa, pb]), torch.cat([ga, gb])
    ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, **mm_types(ids, token_ids["<|image_pad|>"])).logits
    assert (vanilla(ids, pv, grid) - ref).abs().max() <= 1e-4


def test_rope_index_matches_transformers(hf, token_ids, tokenizer):
    ids, _, grid = build_inputs(token_ids, len(tokenizer), [3, (4, 6), 2, (8, 8), 4, (2, 10), 5])
    ref, delta = hf.model.get_rope_index(ids, image_grid_thw=grid, **mm_types(ids, token_ids["<|image_pad|>"]))
    pos, next_pos = rope_index(ids, grid, token_ids["<|image_pad|>"])
    assert torch.equal(pos, ref)
    assert next_pos.tolist() == (delta.flatten() + ids.shape[1]).tolist()


def test_vision_tower_matches_transformers(hf, vanilla):
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor([[1, 4, 6], [1, 18, 20], [1, 2, 2]])
    pv = torch.randn(int(grid.prod(1).sum()), 1176, generator=g)
    ref = hf_vision_features(hf.model.visual, pv, grid)
    ours = vanilla.visual(pv, grid)
    assert ours.shape == ref.shape == (int(grid.prod(1).sum()) // 4, 64)
    assert (ours - ref).abs().max() <= 1e-4


def test_qwen3_last_hidden_state_on_padded_batch(embedder_dir, vilavt, tokenizer):
    from transformers import Qwen3Model
    ref_model = Qwen3Model.from_pretrained(embedder_dir, dtype=torch.float32).eval()
    lens = [5, 8, 2]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(7, len(tokenizer), (3, 8), generator=g)
    mask = (torch.arange(8)[None] < torch.tensor(lens)[:, None]).long()
    ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = vilavt.text_encoder(ids, mask)
    for i, n in enumerate(lens):
        assert (ours[i, :n] - ref[i, :n]).abs().max() <= 1e-4


# -----------------------------------------------------------------------------
# dynamic encoder properties


def two_images():
    g = torch.Generator().manual_seed(5)
    grid = torch.tensor([[1, 4, 6], [1, 10, 8]])
    pv = torch.randn(int(grid.prod(1).sum()), 1176, generator=g)
    return pv, grid


def query(tokenizer, texts, pad_to=None):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
    L = pad_to or max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def block_outputs(model, fn):
    """Run fn() and capture each vision block's output."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.clone())) for b in model.visual.blocks]
    try:
        final = fn()
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def split_tokens(grid):
    n = (grid.prod(1) // 4).tolist()
    return [sum(n[:i]) for i in range(len(n) + 1)]


def test_groups_isolate_images(vilavt, tokenizer):
    pv, grid = two_images()
    q, qm = query(tokenizer, ["find the dot", "read the digit"])
    both = vilavt.encode_images(pv, grid, q, qm, torch.tensor([0, 1]))
    a = vilavt.encode_images(pv[:24], grid[:1], q[:1], qm[:1], torch.tensor([0]))
    b = vilavt.encode_images(pv[24:], grid[1:], q[1:], qm[1:], torch.tensor([0]))
    cut = split_tokens(grid)[1]
    assert (both[:cut] - a).abs().max() <= 1e-5
    assert (both[cut:] - b).abs().max() <= 1e-5


def test_group_mixes_images_only_in_query_aware_layers(vilavt):
    pv, grid = two_images()
    alone_blocks, alone = block_outputs(vilavt, lambda: vilavt.encode_images(pv[:24], grid[:1]))
    group_blocks, group = block_outputs(vilavt, lambda: vilavt.encode_images(pv, grid, image_to_query=torch.tensor([0, 0])))
    # image 0 comes first in its group (rotary offset 0), so before layer 16 nothing may differ
    query_layers = set(vilavt.cfg.vision.query_layers)
    assert query_layers == {16, 17}
    for i, (x, y) in enumerate(zip(alone_blocks, group_blocks)):
        # blocks run in window order; image 0's 24 patches come first either way
        d = (x - y[:24]).abs().max()
        assert (d <= 1e-5) if i < 16 else (d > 1e-3), f"block {i}: {d}"
    assert (group[:6] - alone).abs().max() > 1e-5  # merger outputs are small-scale; equal would be <= 1e-7


def test_query_acts_only_in_query_aware_layers(vilavt, tokenizer):
    pv, grid = two_images()
    q, qm = query(tokenizer, ["find the red dot"])
    plain_blocks, plain = block_outputs(vilavt, lambda: vilavt.encode_images(pv, grid, image_to_query=torch.tensor([0, 0])))
    asked_blocks, asked = block_outputs(vilavt, lambda: vilavt.encode_images(pv, grid, q, qm, torch.tensor([0, 0])))
    for i, (x, y) in enumerate(zip(plain_blocks, asked_blocks)):
        d = (x - y).abs().max()
        assert (d <= 1e-6) if i < 16 else (d > 1e-3), f"block {i}: {d}"
    assert (plain - asked).abs().max() > 1e-5


def test_empty_query_equals_no_text(vilavt, tokenizer):
    pv, grid = two_images()
    q, qm = query(tokenizer, ["", ""], pad_to=5)
    none = vilavt.encode_images(pv, grid, image_to_query=torch.tensor([0, 1]))
    empty = vilavt.encode_images(pv, grid, q, qm, torch.tensor([0, 1]))
    assert torch.equal(none, empty)


def test_query_padding_does_not_matter(vilavt, tokenizer):
    pv, grid = two_images()
    texts = ["find the dot", "is the mark red or blue"]
    a = vilavt.encode_images(pv, grid, *query(tokenizer, texts), torch.tensor([0, 1]))
    b = vilavt.encode_images(pv, grid, *query(tokenizer, texts, pad_to=40), torch.tensor([0, 1]))
    assert (a - b).abs().max() <= 1e-5


def test_rotary_offsets_three_image_group():
    # Three images in one group: grids (h, w) = (2, 4), (4, 2), (2, 2) patches, each inside
    # one window (so window order is plain merge-unit order). max(h, w) = 4, 4, 2, so the
    # images sit at diagonal offsets O = 0, 4, 8 and text slot s at P + s with P = 10.
    cfg = encoder.VisionConfig(depth=1, hidden_size=32, num_heads=2)
    grid = torch.tensor([[1, 2, 4], [1, 4, 2], [1, 2, 2]])
    lay = encoder.make_layout(cfg, grid, [0, 3], [1, 1, 1], "cpu")
    # Patches in merge-unit order: unit (0,0) = (0,0),(0,1),(1,0),(1,1); unit (0,1) = (0,2),(0,3),(1,2),(1,3)
    img0 = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    img1 = [(r + 4, c + 4) for r, c in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]]
    img2 = [(r + 8, c + 8) for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert lay.pos.tolist() == [list(p) for p in img0 + img1 + img2]
    assert lay.tpos.tolist() == [10, 11, 12]
    assert lay.groups.cu == [0, 20] and lay.groups.tcu == [(0, 3)]  # group 1's text comes after group 0's (empty)
    # cos/sin are those of the positions: row frequencies use the row, column ones the column
    cos, _ = encoder.rotary_cos_sin(torch.tensor([[4, 5]]), 16, 10000.0)
    assert torch.equal(lay.cos[9], cos[0])  # image 1's second patch sits at (4, 5)


# -----------------------------------------------------------------------------
# KV cache


def test_kv_cache_prefill_decode_equals_full_forward(vanilla, token_ids, tokenizer):
    ids, pv, grid = build_inputs(token_ids, len(tokenizer), [3, (4, 6), 2, (2, 4), 10], seed=6)
    full = vanilla(ids, pv, grid)
    pos, _ = rope_index(ids, grid, token_ids["<|image_pad|>"])
    T, k = ids.shape[1], ids.shape[1] - 8
    cache = vanilla.new_cache(batch=1, max_len=T + 4)
    start = torch.zeros(1, dtype=torch.long)
    logits = [vanilla(ids[:, :k], pv, grid, cache=cache, cache_pos=start)]
    for t in range(k, T):
        logits.append(vanilla(ids[:, t:t + 1], position_ids=pos[:, :, t:t + 1], cache=cache,
                              cache_pos=torch.tensor([t])))
    assert (torch.cat(logits, 1) - full).abs().max() <= 1e-4


def test_kv_cache_rows_at_different_lengths(vanilla, tokenizer):
    g = torch.Generator().manual_seed(7)
    a = torch.randint(7, len(tokenizer), (1, 12), generator=g)
    b = torch.randint(7, len(tokenizer), (1, 9), generator=g)
    cache = vanilla.new_cache(batch=2, max_len=16)
    vanilla(a[:, :10], cache=cache.view_rows(0, 1), cache_pos=torch.tensor([0]))
    vanilla(b[:, :7], cache=cache.view_rows(1, 2), cache_pos=torch.tensor([0]))
    # one batched decode step: row 0 at slot 10, row 1 at slot 7
    step = torch.stack([a[0, 10:11], b[0, 7:8]])
    cache_pos = torch.tensor([10, 7])
    pos = cache_pos.view(1, 2, 1).expand(3, 2, 1)
    out = vanilla(step, position_ids=pos, cache=cache, cache_pos=cache_pos)
    assert (out[0, 0] - vanilla(a[:, :11])[0, -1]).abs().max() <= 1e-4
    assert (out[1, 0] - vanilla(b[:, :8])[0, -1]).abs().max() <= 1e-4
    # G copies of one prefill equal separate prefills: the copy is exact, and so the two rows decode
    # alike (to rounding only: a batched matmul may round its rows differently, e.g. on 2 threads
    # with AVX-512)
    cache.copy_rows([0], [1])
    assert all(torch.equal(c.k[0], c.k[1]) and torch.equal(c.v[0], c.v[1]) for c in cache.layers)
    out = vanilla(torch.stack([a[0, 10:11]] * 2), position_ids=torch.full((3, 2, 1), 10),
                  cache=cache, cache_pos=torch.tensor([10, 10]))
    assert (out[0] - out[1]).abs().max() <= 1e-5


# -----------------------------------------------------------------------------
# loading and saving


def test_greedy_rollout_is_transformers_generate(hf, vanilla, tokenizer):
    """bench.py rollout times our rollout against transformers' generate, so both must decode the
    same thing: a batch of two prompts of different lengths (two image sizes, so generate left-pads
    one), whose greedy tokens are ours up to our first stop, and whose logits at every step are our
    model's on the same tokens (so the decode's M-RoPE positions agree: under 5.x generate computes
    them only when given bench.mm_types's inputs, and without them this fails)."""
    import data
    import rollout
    from bench import first_turn, generate_inputs, hf_generate
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for h, w in ((224, 280), (168, 224))]
    prompts = [rollout.Prompt([im], q) for im, q in zip(images, ("What is this?", "Which colour is the card here?"))]
    ct, budget, n = data.ChatTokenizer(tokenizer), data.Budget(), 16
    pad, image_pad, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|image_pad|>", "<|im_end|>"))
    tokens, scores = hf_generate(hf, prompts, ct, budget, pad, image_pad, n, scores=True)
    ids, mask, pv, grid = generate_inputs(prompts, ct, budget, pad)
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]
    patches = pv.split(grid.prod(1).tolist())
    for b in range(2):  # our model, teacher-forced on the prompt (unpadded) and generate's tokens
        row = torch.cat([ids[b][mask[b].bool()], tokens[b]])
        logits = vanilla(row[None], patches[b], grid[b:b + 1])[0, -n - 1:-1]
        keep = torch.arange(logits.shape[1]) != end  # min_new_tokens holds the end token at -inf
        assert (logits[:, keep] - scores[b][:, keep]).abs().max() <= 1e-4
    limits = rollout.Limits(max_turn_tokens=n, max_new_tokens=n, max_context=2048)
    for t, row in zip(rollout.rollout(vanilla, ct, prompts, 1, rollout.Sampling(greedy=True), limits, budget), tokens):
        mine = first_turn(t)
        assert len(mine) > 0 and row[:len(mine)].tolist() == mine


def test_stock_folder_loads_as_vanilla(vanilla):
    v = vanilla.cfg.vision
    assert not vanilla.is_vilavt and v.query_layers == () and v.fullatt_block_indexes == (7, 15, 17)
    assert not hasattr(vanilla, "text_encoder") and vanilla.new_layer_names() == []


def test_stock_plus_embedder_builds_vilavt(stock_dir, embedder_dir):
    from safetensors.torch import load_file
    m = ViLaVT.from_pretrained(stock_dir, embedder_dir)
    v = m.cfg.vision
    assert v.query_layers == (16, 17) and v.fullatt_block_indexes == (7, 15)
    emb = load_file(os.path.join(embedder_dir, "model.safetensors"))
    for k, t in emb.items():
        assert torch.equal(m.state_dict()["text_encoder." + k], t), k
    w = m.text_proj.weight
    assert w.shape == (32, 32) and 0.01 < w.std() < 0.03 and m.text_proj.bias.abs().max() == 0
    assert m.visual.blocks[16].attn.instruct_key_proj.bias.abs().max() == 0
    assert not hasattr(m.visual.blocks[15].attn, "instruct_key_proj")


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_roundtrip_and_release_config(vilavt, tmp_path):
    d = str(tmp_path / "ckpt")
    vilavt.save_pretrained(d)
    cfg = read_json(os.path.join(d, "config.json"))
    assert cfg["model_type"] == "vilavt" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration_Vilavt"]
    assert cfg["vision_config"]["fullatt_block_indexes"] == [7, 15]
    assert cfg["text_encoder_config"]["head_dim"] == 16
    back = ViLaVT.from_pretrained(d)
    assert back.cfg.vision.query_layers == (16, 17) and state_equal(vilavt, back)
    # a folder with only the release's fields loads with the release's meaning ("late" = >= 16)
    del cfg["vision_config"]["query_aware_layers"]
    cfg["vision_config"]["integration_point"] = "late"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert ViLaVT.from_pretrained(d).cfg.vision.query_layers == (16, 17)


def test_sharded_checkpoint_loads(vilavt, tmp_path):
    d = str(tmp_path / "sharded")
    names = vilavt.save_pretrained(d, max_shard_bytes=200_000)
    assert len(names) > 2 and os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(d, "model.safetensors"))
    assert state_equal(vilavt, ViLaVT.from_pretrained(d))


def test_vanilla_save_loads_in_transformers(vanilla, tmp_path, token_ids, tokenizer):
    d = str(tmp_path / "vanilla")
    vanilla.save_pretrained(d)
    ref = hf_vl(d)
    ids, pv, grid = build_inputs(token_ids, len(tokenizer), [3, (4, 6), 5])
    ref = ref(input_ids=ids, pixel_values=pv, image_grid_thw=grid, **mm_types(ids, token_ids["<|image_pad|>"])).logits
    assert (ref - vanilla(ids, pv, grid)).abs().max() <= 1e-4


def test_flat_config_layout(stock_dir, tmp_path, vanilla, token_ids, tokenizer):
    # the 7B hub config is flat (LM fields at top level)
    c = config_from_hf(read_json(os.path.join(SHARED, "fixtures/configs/qwen2_5_vl_7b_instruct.config.json")))
    assert (c.lm.hidden_size, c.lm.num_key_value_heads, c.lm.mrope_section) == (3584, 4, (16, 24, 24))
    assert c.vision.fullatt_block_indexes == (7, 15, 23, 31) and c.lm.image_token_id == 151655
    # a tiny folder rewritten in the flat layout loads to the same model
    d = tmp_path / "flat"
    shutil.copytree(stock_dir, d)
    nested = read_json(d / "config.json")
    flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **nested["text_config"], "model_type": "qwen2_5_vl"}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    (d / "config.json").write_text(json.dumps(flat))
    assert state_equal(vanilla, ViLaVT.from_pretrained(str(d)))


def corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    return os.path.join(dst, "model.safetensors")


def test_truncated_file_raises(stock_dir, tmp_path):
    path = corrupt_copy(stock_dir, tmp_path / "trunc")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        ViLaVT.from_pretrained(str(tmp_path / "trunc"))


def test_wrong_shape_missing_and_unexpected_keys_are_listed(stock_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    path = corrupt_copy(stock_dir, tmp_path / "bad")
    sd = load_file(path)
    sd["model.norm.weight"] = torch.ones(3)
    del sd["visual.merger.ln_q.weight"]
    sd["visual.blocks.0.attn.extra.weight"] = torch.ones(2)
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        ViLaVT.from_pretrained(str(tmp_path / "bad"))
    msg = str(e.value)
    assert "model.norm.weight: checkpoint (3,) vs model (64,)" in msg and "visual.blocks.0.attn.extra.weight" in msg
    del sd["model.norm.weight"], sd["visual.blocks.0.attn.extra.weight"]
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"missing 2 tensors: .*model.norm.weight.*visual.merger.ln_q.weight|"
                                         r"missing 2 tensors: .*visual.merger.ln_q.weight.*model.norm.weight"):
        ViLaVT.from_pretrained(str(tmp_path / "bad"))


def test_wrong_config_raises(stock_dir, tmp_path):
    d = tmp_path / "cfg"
    shutil.copytree(stock_dir, d)
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type"):
        ViLaVT.from_pretrained(str(d))
    (d / "config.json").write_text('{"model_type": ')
    with pytest.raises(ValueError, match="malformed JSON"):
        ViLaVT.from_pretrained(str(d))


def test_config_spellings_of_transformers_4_and_5(stock_dir):
    """transformers 5.x writes rope_parameters {rope_type, mrope_section, rope_theta} where 4.x
    wrote rope_scaling and a top-level rope_theta: both load alike, and saving keeps the layout
    the checkpoint came in. A wrongly typed field is named."""
    d = read_json(os.path.join(stock_dir, "config.json"))
    t = d.get("text_config") or d
    old = config_from_hf(d)
    five = json.loads(json.dumps(d))
    t5 = five.get("text_config") or five
    for x in (five, t5):
        x.pop("rope_scaling", None)
        x.pop("rope_theta", None)
    t5["rope_parameters"] = {"rope_type": "default", "mrope_section": list(old.lm.mrope_section), "rope_theta": 5e5}
    new = config_from_hf(five)
    assert new.lm.mrope_section == old.lm.mrope_section and new.lm.rope_theta == 5e5 != old.lm.rope_theta
    assert "rope_parameters" in json.dumps(config_to_hf(new)) and "rope_scaling" not in json.dumps(config_to_hf(new))
    bad = json.loads(json.dumps(d))
    (bad.get("text_config") or bad)["num_hidden_layers"] = str(t["num_hidden_layers"])
    with pytest.raises(ValueError, match="x.json: field 'num_hidden_layers' must be an integer, got '2'"):
        config_from_hf(bad, where="x.json")


def test_7b_parameter_count():
    c = config_from_hf(read_json(os.path.join(SHARED, "fixtures/configs/qwen2_5_vl_7b_instruct.config.json")))
    with torch.device("meta"):
        m = ViLaVT(c)
    assert sum(p.numel() for p in m.parameters()) == 8_292_166_656


# -----------------------------------------------------------------------------
# memory: no N x N mask over all images


def test_encoder_attention_is_segmented(vanilla, monkeypatch):
    calls = []
    real = encoder.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[-2], k.shape[-2], attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(encoder.F, "scaled_dot_product_attention", spy)
    grid = torch.tensor([[1, 32, 32]] * 8)  # 8 images x 1024 patches = 8192 tokens
    pv = torch.randn(8192, 1176)
    out = vanilla.visual(pv, grid)
    assert out.shape == (2048, 64)
    assert calls and all(m is None for _, _, m in calls)
    assert max(lk for _, lk, _ in calls) == 1024  # the largest segment is one image
    # windows hold 64 patches; full layers one image: never the whole 8192-token sequence
    assert sorted({(lq, lk) for lq, lk, _ in calls}) == [(64, 64), (1024, 1024)]
