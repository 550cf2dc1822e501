"""
data.py: the tokenizer builder, chat rendering (against a literal golden in the format of
the paper's Figures 15/16 and SPEC 4), labels, image-token counts against the encoder, the
crop rule through Context, bad records, the release importer, and the zoom world.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import Budget, ChatTokenizer, Context, RecordError, TrajectoryDataset, render_sample

PAD = "<|image_pad|>"


def image_block(n):
    return "<|vision_start|>" + PAD * n + "<|vision_end|>"


@pytest.fixture(scope="module")
def ct(tokenizer):
    return ChatTokenizer(tokenizer)


def save(img, path):
    img.save(path)
    return os.path.basename(path)


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for x in lines:
            f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return str(path)


# -----------------------------------------------------------------------------
# tokenizer


def test_build_tokenizer_is_deterministic_byte_level_and_compact(tmp_path):
    a = data.build_tokenizer(str(tmp_path / "a"))
    data.build_tokenizer(str(tmp_path / "b"))
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert len(a) <= 1024
    for t in data.SPECIAL_TOKENS:
        i = a.convert_tokens_to_ids(t)
        assert i != a.unk_token_id and a.convert_ids_to_tokens(i) == t
        assert a.encode(t, add_special_tokens=False) == [i]  # one token, never split
    assert a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"
    text = "héllo wörld 世界 \t\r\n 😀 ~`|"
    assert a.decode(a.encode(text)) == text  # byte-level: anything encodes and round-trips
    assert len(a.encode(data.SYSTEM_PROMPT)) < len(data.SYSTEM_PROMPT) / 3  # merges learnt from the prompts
    assert a.encode("2024", add_special_tokens=False) == [a.convert_tokens_to_ids(c) for c in "2024"]  # Qwen: digit by digit


# -----------------------------------------------------------------------------
# rendering: a literal golden of a two-tool-call trajectory

SYSTEM = """You are a helpful assistant. Your goal is to solve the problem in the provided image(s) based on the user's instruction. Proceed step by step, optionally using the zoom-in tool one or more times to examine key areas closely. Selected regions will be cropped and processed externally, then re-encoded with your query to extract critical details.

### Tools
If needed, use the zoom-in tool one or more times to examine specific areas in detail.

### Tool Format
#### Structure
{
  "region": [
    {
      "index": int, # Target image index to zoom in (0-based)
      "bbox_2d": list, # Format: [x1, y1, x2, y2], where (x1, y1) is top-left corner and (x2, y2) is bottom-right corner
    },
    ... # Additional regions (optional)
  ],
  "query": str # Description of what to look for in the selected regions
}

### Parameters:
- region: List of dictionaries, each containing:
  - index: Integer, specifying which image to zoom in
  - bbox_2d: List of 4 integers [x1, y1, x2, y2] defining the region
- query: String describing the search target

### Constraints:
- At least one region must be specified
- All coordinates must be within image boundaries
- x1 < x2 and y1 < y2 must be satisfied

### Example:
<tool> {"region": [{"index": 0, "bbox_2d": [100, 200, 300, 400]}], "query": "Look for the red button"} </tool>"""

# Figure 16 for one image (index line after the image block, size line, question, the two
# formats, the closing notes); image blocks expanded to their pad tokens.
# Token counts by hand: the 112x84 original stays 112x84 (multiples of 28) = 8x6 patches = 12
# tokens. Call 1, bbox [0, 0, 56, 42] on image 0 -> region (0, 0, .5, .5), s = 1, scale
# min(2, 2, 2) = 2 -> 112x84 -> 12 tokens. Call 2, bbox [28, 0, 112, 42] on crop 1 (112x84
# showing (0, 0, .5, .5), s = 2) -> region (.125, 0, .5, .25), scale min(4, 1/.375, 4) = 8/3
# -> 112x56 -> 8x4 patches = 8 tokens.
GOLDEN = ("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
          "<|im_start|>user\n" + image_block(12) + "The index of the provided image is 0.\n"
          "The image has size: width 112, height 84.\n"
          "Question: What number is on the sign?\n"
          "If you need to zoom in for more details or examine specific regions, make tool call following the format:\n"
          "<think> Your reasoning about where to look and why </think>\n"
          '<tool> {"region": [{"index": int, "bbox_2d": [x1, y1, x2, y2]}, ...], "query": str} </tool>\n'
          "If you have enough information to answer the original question:\n"
          "<think> Your reasoning here. </think>\n"
          "<answer> Your final answer here. </answer>\n"
          "- Note that x1, y1, x2, y2 are the coordinates of the bounding box in the specfied image by the index.\n"
          "- You must strictly follow the above output format.\n"
          "- In <answer>, provide only the final answer in the simplest required form:\n"
          "  - For multiple-choice questions: output only the letter (e.g., A, B, C).\n"
          "  - For yes/no questions: output only Yes or No.\n"
          "  - For numerical answers: output only the number (e.g., 42, 3.14).\n"
          "  - Do not include explanations, units, punctuation, or extra words.<|im_end|>\n"
          "<|im_start|>assistant\n"
          "<think> The sign is in the top left. I will zoom in there. </think>\n"
          '<tool> {"region": [{"index": 0, "bbox_2d": [0, 0, 56, 42]}], "query": "find the sign"} </tool><|im_end|>\n'
          "<|im_start|>user\n<tool_response>" + image_block(12) +
          "The index of the zoom-in image is 1 (width: 112, height: 84).\n"
          "Continue your reasoning. To zoom in again, make a tool call in the same format:\n"
          "<think> Your reasoning about where to look and why </think>\n"
          '<tool> {"region": [{"index": int, "bbox_2d": [x1, y1, x2, y2]}, ...], "query": str} </tool>\n'
          "If you have enough information to answer the original question:\n"
          "<think> Your reasoning here. </think>\n"
          "<answer> Your final answer here. </answer></tool_response><|im_end|>\n"
          "<|im_start|>assistant\n"
          "<think> The sign is on the right of image 1. </think>\n"
          '<tool> {"region": [{"index": 1, "bbox_2d": [28, 0, 112, 42]}], "query": "read the number on the sign"} '
          "</tool><|im_end|>\n"
          "<|im_start|>user\n<tool_response>" + image_block(8) +
          "The index of the zoom-in image is 2 (width: 112, height: 56).\n"
          "You have used all allowed tool calls. No more tool calls are allowed: give your final answer now in this "
          "format:\n"
          "<think> Your reasoning here. </think>\n"
          "<answer> Your final answer here. </answer></tool_response><|im_end|>\n"
          "<|im_start|>assistant\n"
          "<think> The sign reads 42. </think>\n"
          "<answer> 42 </answer><|im_end|>")

STEPS = [
    {"think": "The sign is in the top left. I will zoom in there.",
     "tool": {"region": [{"index": 0, "bbox_2d": [0, 0, 56, 42]}], "query": "find the sign"}},
    {"think": "The sign is on the right of image 1.",
     "tool": {"region": [{"index": 1, "bbox_2d": [28, 0, 112, 42]}], "query": "read the number on the sign"}},
    {"think": "The sign reads 42.", "answer": "42"},
]


@pytest.fixture(scope="module")
def golden_sample(tmp_path_factory, ct):
    root = tmp_path_factory.mktemp("golden")
    rng = np.random.default_rng(0)
    name = save(Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)), str(root / "sign.png"))
    rec = {"images": [name], "question": "What number is on the sign?", "problem_type": "numerical",
           "answer": "42", "max_tool_calls": 2, "steps": STEPS}
    data.check_record(rec, "golden:1", image_root=str(root), need_steps=True)
    return render_sample(rec, "golden:1", str(root), ct, Budget())


def test_render_matches_golden(golden_sample, tokenizer):
    s = golden_sample
    assert s["text"] == GOLDEN
    # piecewise tokenization (text pieces, image blocks as ids, assistant turns) = the whole text at once
    assert s["input_ids"].tolist() == tokenizer.encode(GOLDEN)
    assert [v.display for v in s["context"].views] == [(112, 84), (112, 84), (112, 56)]
    assert s["grid_thw"].tolist() == [[1, 6, 8], [1, 6, 8], [1, 4, 8]]
    assert s["image_to_query"].tolist() == [0, 1, 2]


def test_labels_cover_exactly_the_assistant_turns(golden_sample, tokenizer):
    ids, labels = golden_sample["input_ids"].tolist(), golden_sample["labels"].tolist()
    header = tokenizer.encode("<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    want = [-100] * len(ids)
    starts = [i + len(header) for i in range(len(ids)) if ids[i:i + len(header)] == header]
    assert len(starts) == 3
    for a in starts:  # from after "<|im_start|>assistant\n" through the turn's own <|im_end|>
        b = ids.index(im_end, a)
        want[a:b + 1] = ids[a:b + 1]
    assert labels == want
    turns = [tokenizer.decode(ids[a:ids.index(im_end, a) + 1]) for a in starts]
    assert turns == [data.assistant_text(s) + "<|im_end|>" for s in STEPS]


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    import model as M
    torch.manual_seed(0)
    m = M.ViLaVT(M.tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(PAD)))
    m.init_weights()
    return m.eval()


def test_image_pad_counts_equal_encoder_outputs(golden_sample, zoom_world, ct, tiny_model, tokenizer):
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    vs_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    multi = min((rec for _, rec in data.read_jsonl(zoom_world["train"])[0] if rec["category"] == "multi"),
                key=lambda rec: len(rec["images"]))  # several images, and crops of several images in one group
    samples = [golden_sample, render_sample(multi, "zw", zoom_world["image_root"], ct, zoom_world["budget"])]
    for k, s in enumerate(samples):
        ids = s["input_ids"].tolist()
        blocks = []  # pad tokens of each image block, in order
        for i, t in enumerate(ids):
            if t == vs_id:
                j = i + 1
                while ids[j] == pad_id:
                    j += 1
                blocks.append(j - i - 1)
        views = s["context"].views
        assert len(blocks) == len(views) == len(s["grid_thw"])
        with torch.no_grad():
            for v, n in zip(views, blocks):
                assert tiny_model.encode_images(v.pixel_values, v.grid_thw[None]).shape[0] == n
            assert sum(blocks) == ids.count(pad_id)
            if k == 0:  # the whole model on the golden sample, groups and inquiries included; hidden_states
                # asserts features == pad tokens itself
                enc = {k: s[k] for k in ("pixel_values", "grid_thw", "query_ids", "query_mask", "image_to_query")}
                assert tiny_model.encode_images(**enc).shape[0] == sum(blocks)
                assert tiny_model.hidden_states(s["input_ids"][None], **enc).shape[1] == len(ids)


# -----------------------------------------------------------------------------
# the crop rule through Context


def test_crop_of_crop_maps_to_the_original_region():
    # A 448x336 original made of 4x4 solid cells (112x84 each), displayed at 224x168.
    colors = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    orig = Image.fromarray(np.repeat(np.repeat(colors, 84, axis=0), 112, axis=1))
    ctx = Context([orig], max_pixels=224 * 168)
    assert ctx.views[0].display == (224, 168)
    # crop 1: [56, 42, 168, 126] of 224x168 -> (.25, .25, .75, .75); s = .5, scale min(1, 2, 2) = 1 -> 224x168
    c1, = ctx.zoom({"region": [{"index": 0, "bbox_2d": [56, 42, 168, 126]}], "query": "q1"})
    assert c1.region == pytest.approx((0.25, 0.25, 0.75, 0.75)) and c1.display == (224, 168)
    # crop 2 on crop 1: [112, 0, 224, 84] -> x .25 + .5 * [.5, 1], y .25 + .5 * [0, .5] = (.5, .25, .75, .5):
    # exactly cell (column 2, row 1); s = 1 (crop 1 shows 224x168 original px at 224x168), scale 2 -> 224x168
    c2, = ctx.zoom({"region": [{"index": 1, "bbox_2d": [112, 0, 224, 84]}], "query": "q2"})
    assert c2.region == pytest.approx((0.5, 0.25, 0.75, 0.5)) and c2.display == (224, 168)
    assert (c2.source, c2.parent, c2.group) == (0, 1, 2)
    crop, region = data.crop_image(orig, c1.region, c1.display, [112, 0, 224, 84])
    inner = np.asarray(crop)[8:-8, 8:-8].reshape(-1, 3)
    assert (inner == colors[1, 2]).all()  # cut from the original, at that cell
    # and the pixel values the encoder gets are that crop's
    want, _ = data.preprocess_image(crop, data.MIN_PIXELS, data.budget_per_crop())
    assert torch.equal(c2.pixel_values, want)


# -----------------------------------------------------------------------------
# bad input


@pytest.fixture()
def bad_root(tmp_path):
    save(Image.new("RGB", (112, 84), (200, 10, 10)), str(tmp_path / "ok.png"))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    return tmp_path


def good(**kw):
    rec = {"images": ["ok.png"], "question": "q?", "problem_type": "numerical", "answer": "1",
           "steps": [{"think": "t", "tool": {"region": [{"index": 0, "bbox_2d": [0, 0, 56, 42]}], "query": "q"}},
                     {"think": "t", "answer": "1"}]}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("line, field", [
    (good(images=["missing.png"]), "images"),
    (good(problem_type="essay"), "problem_type"),
    ('{"images": ["ok.png"], "question": ', None),
    (good(steps=[{"think": "t"}]), "steps[0]"),
])
def test_bad_record_at_load(bad_root, ct, line, field):
    path = write_jsonl(bad_root / "d.jsonl", [good(), line])
    with pytest.raises(RecordError) as e:
        TrajectoryDataset(path, str(bad_root), ct)
    assert f"{path}:2" in str(e.value)
    assert (f"field '{field}'" in str(e.value)) if field else "malformed JSON" in str(e.value)
    logged = []
    ds = TrajectoryDataset(path, str(bad_root), ct, skip_bad=True, log=logged.append)
    assert len(ds) == 1 and ds.n_bad == 1 and f"{path}:2" in logged[0]
    assert ds[0] is not None


@pytest.mark.parametrize("rec, field", [
    (good(images=["broken.png"]), "images"),  # exists, cannot be decoded
    (good(steps=[{"think": "t", "tool": {"region": [{"index": 0, "bbox_2d": [0, 0, 113, 42]}], "query": "q"}},
                 {"think": "t", "answer": "1"}]), "steps[0].tool"),  # box outside the 112x84 image
    (good(steps=[{"think": "t", "tool": {"region": [{"index": 1, "bbox_2d": [0, 0, 5, 5]}], "query": "q"}},
                 {"think": "t", "answer": "1"}]), "steps[0].tool"),  # index of an image that does not exist
])
def test_bad_record_at_render(bad_root, ct, rec, field):
    path = write_jsonl(bad_root / "d.jsonl", [good(), rec])
    ds = TrajectoryDataset(path, str(bad_root), ct)
    assert ds[0] is not None
    with pytest.raises(RecordError) as e:
        ds[1]
    assert f"{path}:2" in str(e.value) and f"field '{field}'" in str(e.value)
    logged = []
    ds = TrajectoryDataset(path, str(bad_root), ct, skip_bad=True, log=logged.append)
    assert ds[1] is None and ds.n_bad == 1 and f"{path}:2" in logged[0]


def test_no_usable_records(bad_root, ct):
    path = write_jsonl(bad_root / "d.jsonl", ["{not json"])
    with pytest.raises(RecordError, match="no usable records"):
        TrajectoryDataset(path, str(bad_root), ct, skip_bad=True, log=lambda m: None)


# -----------------------------------------------------------------------------
# the importer of the release's SFT records


def test_import_release_record(tmp_path, ct, tokenizer):
    rng = np.random.default_rng(1)
    save(Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)), str(tmp_path / "orig.png"))
    crop_file = Image.fromarray(rng.integers(0, 256, (84, 140, 3), dtype=np.uint8))  # not what the crop rule makes
    save(crop_file, str(tmp_path / "orig_crop0.png"))
    tool = '{"region": [{"index": 0, "bbox_2d": [0, 0, 56, 42]}], "query": "the sign"}'
    release = {
        "images": ["orig.png", "orig_crop0.png"],
        "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "<image>\nWhat number is on the sign?"},
            {"from": "gpt", "value": f"<think> The sign is small. </think>\n<tool> {tool} </tool>"},
            {"from": "human", "value": "<tool_response><image>The index of the zoom-in image is 1.</tool_response>"},
            {"from": "gpt", "value": "<think> It reads 7. </think>\n<answer> 7 </answer>"}],
        "queries": ["", "read the number on the sign"],
        "image_to_query_mapping": [0, 1],
        "max_pixels": 200704,
    }
    rec = data.import_release_record(release, "release.json:1")
    data.check_record(rec, "release.json:1", image_root=str(tmp_path), need_steps=True, need_answer=False)
    assert rec["images"] == ["orig.png"] and rec["steps"][0]["crops"] == ["orig_crop0.png"]
    assert rec["steps"][0]["tool"]["query"] == "read the number on the sign"  # the encoder's query, from `queries`
    assert rec["steps"][1]["answer"] == "7" and rec["max_pixels"] == 200704
    s = render_sample(rec, "release.json:1", str(tmp_path), ct)
    assert s["text"] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                         + image_block(12) + "\nWhat number is on the sign?<|im_end|>\n<|im_start|>assistant\n"
                         f"<think> The sign is small. </think>\n<tool> {tool} </tool><|im_end|>\n"
                         "<|im_start|>user\n<tool_response>" + image_block(15) +
                         "The index of the zoom-in image is 1.</tool_response><|im_end|>\n<|im_start|>assistant\n"
                         "<think> It reads 7. </think>\n<answer> 7 </answer><|im_end|>")
    assert s["input_ids"].tolist() == tokenizer.encode(s["text"])
    crop_view = s["context"].views[1]  # the pre-made file is what gets encoded (140x84: 10x6 patches)
    want, grid = data.preprocess_image(crop_file, data.MIN_PIXELS, data.budget_per_crop())
    assert torch.equal(crop_view.pixel_values, want) and crop_view.grid_thw.tolist() == [1, 6, 10]
    assert crop_view.region == pytest.approx((0, 0, 0.5, 0.5))
    q = tokenizer.encode("read the number on the sign") + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert s["query_ids"][1, :len(q)].tolist() == q and s["query_mask"][1].sum() == len(q)
    assert s["query_mask"][0].sum() == 0 and s["image_to_query"].tolist() == [0, 1]

    bad = dict(release, image_to_query_mapping=[0])
    with pytest.raises(RecordError, match="release.json:1: field 'image_to_query_mapping'"):
        data.import_release_record(bad, "release.json:1")


# -----------------------------------------------------------------------------
# zoom world

# every kind of sample (the demo's default is dots only, on a 2x2 grid, no crop of a crop)
CFG = data.ZoomWorldConfig(mark_kinds=("dots", "digit"), grid=(3, 3), n_cards=(3, 6), share_crop_of_crop=0.25)


@pytest.fixture(scope="module")
def zoom_world(tmp_path_factory):
    return data.make_zoom_world(str(tmp_path_factory.mktemp("zw")), n_train=40, n_eval=10, cfg=CFG, seed=3)


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_zoom_world_is_deterministic(tmp_path):
    a = data.make_zoom_world(str(tmp_path / "a"), n_train=6, n_eval=2, seed=5)
    b = data.make_zoom_world(str(tmp_path / "b"), n_train=6, n_eval=2, seed=5)
    c = data.make_zoom_world(str(tmp_path / "c"), n_train=6, n_eval=2, seed=6)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert a["budget"] == b["budget"] == data.read_budget(a["meta"]) == Budget(max_pixels=168 * 168)


def test_zoom_world_records_check_render_and_cover_their_targets(zoom_world, ct):
    root, budget = zoom_world["image_root"], zoom_world["budget"]
    recs = []
    for split in ("train", "eval"):
        rows, n_bad = data.read_jsonl(zoom_world[split], image_root=root, need_steps=True)
        assert n_bad == 0
        recs += [rec for _, rec in rows]
    n_calls = n_direct = 0
    for rec in recs:
        assert rec["category"] in ("single", "multi", "text-only")
        assert len(rec["target_boxes"]) == len(rec["images"]) and rec["max_pixels"] == 168 * 168
        if rec["problem_type"] == "multiple choice":
            letters = [o[0] for o in rec["options"]]
            assert rec["answer"] in letters and rec["steps"][-1]["answer"] == rec["answer"]
        else:
            assert rec["options"] is None and rec["answer"].isdigit()
        s = render_sample(rec, rec["id"], root, ct, budget)
        ctx = s["context"]
        n_orig = len(rec["images"])
        assert [v.display for v in ctx.views[:n_orig]] == [(168, 168)] * n_orig  # 36 tokens each
        for view in ctx.views[n_orig:]:  # every gold crop covers its target card
            tx1, ty1, tx2, ty2 = rec["target_boxes"][view.source]
            x1, y1, x2, y2 = view.region
            assert x1 <= tx1 + 1e-9 and y1 <= ty1 + 1e-9 and x2 >= tx2 - 1e-9 and y2 >= ty2 - 1e-9, rec["id"]
            n_calls += 1
        if rec["category"] == "text-only":
            assert len(rec["steps"]) == 1 and "tool" not in rec["steps"][0]
        if rec["task"] == "largest-color":  # the target is the one largest card, the answer its colour
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            cards = sorted(rec["scene"][0], key=lambda c: -area(c["box"]))
            assert area(cards[0]["box"]) > 2 * area(cards[1]["box"]) and cards[0]["box"] == rec["target_boxes"][0]
            assert rec["options"][ord(rec["answer"]) - 65] == f"{rec['answer']}. {cards[0]['color']}"
        values = [next((c["value"] for c in cards if c["box"] == t), None) for cards, t in
                  zip(rec["scene"], rec["target_boxes"])]  # the target cards' marks, from the scene
        gold = rec["answer"] if rec["options"] is None else rec["options"][ord(rec["answer"]) - 65][3:]
        if rec["category"] == "single":
            assert gold == str(values[0])
        if rec["task"] == "total":
            assert gold == str(sum(values))
        if rec["task"] == "which-image":
            assert str(values[int(gold.split()[-1])]) in rec["question"] and len(set(values)) == len(values)
        for j, cards in enumerate(rec["scene"]):  # one card per colour; cards never overlap
            assert len({c["color"] for c in cards}) == len(cards)
            for a in cards:
                for b in cards:
                    assert a is b or a["box"][2] <= b["box"][0] or b["box"][2] <= a["box"][0] or \
                        a["box"][3] <= b["box"][1] or b["box"][3] <= a["box"][1]
        if rec.get("mode") == "direct":  # the no-tool share of the train split: one answer step
            assert rec["id"].startswith("train") and len(rec["steps"]) == 1 and "tool" not in rec["steps"][0]
            assert "system" not in rec and data.DIRECT_INSTRUCTIONS in s["text"]
            n_direct += 1
            continue
        assert rec["system"] == data.ZW_SYSTEM and s["text"].startswith(f"<|im_start|>system\n{data.ZW_SYSTEM}")
        if rec["category"] == "multi":
            regions = rec["steps"][0]["tool"]["region"]
            assert sorted(r["index"] for r in regions) == list(range(n_orig)) and n_orig >= 2
            assert len(set(s["image_to_query"][n_orig:].tolist())) == 1  # crops of several images: one group
        if rec["task"].endswith("zoom2"):  # a crop of a crop
            assert rec["steps"][1]["tool"]["region"][0]["index"] == n_orig
            assert ctx.views[-1].parent == n_orig
    assert n_calls > 30 and n_direct == round(CFG.share_direct * 40)


def test_zoom_world_shares(zoom_world):
    recs = [rec for _, rec in data.read_jsonl(zoom_world["train"])[0]]
    n = len(recs)
    cat = lambda c: [r for r in recs if r["category"] == c]  # noqa: E731
    assert abs(len(cat("text-only")) / n - CFG.share_text_only) < 0.03
    assert abs(len(cat("multi")) / (n - len(cat("text-only"))) - CFG.share_multi) < 0.05
    assert abs(sum(r["problem_type"] == "multiple choice" for r in recs) / n - CFG.share_mc) < 0.05
    zoom2 = [r for r in cat("single") if r["task"].endswith("zoom2")]
    assert abs(len(zoom2) / len(cat("single")) - CFG.share_crop_of_crop) < 0.05
    assert {r["mark"] for r in recs} == {"dots", "digit"}
    meta = json.load(open(zoom_world["meta"]))
    assert sum(meta["counts"]["train"].values()) == n and meta["budget"]["max_pixels"] == 168 * 168


def test_zoom_world_marks_need_the_zoom():
    """The honest resolution check. Two scenes identical but for the target card's mark (2 vs 5
    dots; digits 3 vs 8, which differ in just two font cells). At the display the model gets
    for the original (BICUBIC to 168x168, as preprocess_image does), the card images differ by
    at most a few grey levels (rounding, bicubic tails at mark corners). After the gold zoom
    (crop rule + smart_resize), they differ by ~100 levels; also after an off-grid zoom whose
    crop smart_resize has to resample."""
    Wd, Hd, r = data._zw_geometry(CFG)
    budget = data.zoom_world_budget(CFG)

    def scene(kind, value, slots):
        target = {"color": "red", "kind": kind, "value": value, "slots": slots, "big": False,
                  "box": (120, 128, 184, 168)}
        other = {"color": "blue", "kind": "dots", "value": 2, "slots": [0, 5], "big": False, "box": (240, 240, 304, 280)}
        return data._zw_render(np.random.default_rng(7), CFG, r, [target, other])

    def card_diff(a, b, box):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        d = np.abs(a.astype(float) - b.astype(float))[y1:y2, x1:x2]
        return d.mean(), d.max()

    def shown(img, bbox=None):  # what the model sees: the display, or a crop at its display size
        if bbox is None:
            return np.asarray(img.resize((Wd, Hd), Image.Resampling.BICUBIC)), (0, 0, 1, 1), (Wd, Hd)
        crop, region = data.crop_image(img, (0, 0, 1, 1), (Wd, Hd), bbox)
        h, w = data.smart_resize(crop.height, crop.width, data.FACTOR, budget.min_pixels, budget.for_crops())
        return np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC)), region, (w, h)

    card = (120 / 336, 128 / 336, 184 / 336, 168 / 336)
    gold = data._zw_cells_bbox(CFG, (Wd, Hd, r), data._zw_cell(CFG, [v * 336 for v in card]))
    off_grid = [55, 59, 95, 89]  # 40x30 display px around the card: the 80x60 crop is resampled to 84x56
    for kind, (va, sa), (vb, sb) in [("dots", (2, [0, 1]), (5, [0, 2, 3, 5, 7])), ("digit", (3, None), (8, None))]:
        A, B = scene(kind, va, sa), scene(kind, vb, sb)
        a, _, _ = shown(A)
        b, _, _ = shown(B)
        mean0, max0 = card_diff(a, b, [card[0] * Wd, card[1] * Hd, card[2] * Wd, card[3] * Hd])
        assert np.abs(a.astype(float) - b.astype(float)).max() <= 4  # the whole display image
        assert mean0 < 0.5 and max0 <= 4, (kind, mean0, max0)
        for bbox, floor in ((gold, 90), (off_grid, 40)):
            a, region, disp = shown(A, bbox)
            b, _, _ = shown(B, bbox)
            mean1, max1 = card_diff(a, b, data._zw_in(card, region, disp))
            assert max1 >= floor and max1 >= 10 * max0 and mean1 > 5 * mean0, (kind, bbox, mean0, mean1, max1)
    assert (gold[2] - gold[0]) % 14 == 0 and (gold[3] - gold[1]) % 14 == 0  # gold crops: no resampling


def test_default_zoom_world_boxes_are_the_named_cells(tmp_path):
    """The demo's default world (2x2 grid): every gold box is the cell the think names for that
    image, and it holds the target card."""
    import re
    zw = data.make_zoom_world(str(tmp_path), n_train=30, n_eval=0)
    cells = {"in the top left": [0, 0, 84, 84], "in the top right": [84, 0, 168, 84],
             "in the bottom left": [0, 84, 84, 168], "in the bottom right": [84, 84, 168, 168]}
    n = 0
    for _, rec in data.read_jsonl(zw["train"])[0]:
        if "tool" not in rec["steps"][0]:
            continue
        named = {int(i): p for p, i in re.findall(r"(in the \w+ \w+) of image (\d)", rec["steps"][0]["think"])}
        for r in rec["steps"][0]["tool"]["region"]:
            assert r["bbox_2d"] == cells[named[r["index"]]], rec["id"]
            t = [v * 168 for v in rec["target_boxes"][r["index"]]]
            x1, y1, x2, y2 = r["bbox_2d"]
            assert x1 <= t[0] and y1 <= t[1] and t[2] <= x2 and t[3] <= y2
            n += 1
        assert rec["prompt"].endswith("Question: " + data.format_question(rec["question"], rec["options"]))
    assert n >= 15
