"""
data.py: chat rendering (against a literal golden in the format of the paper's Figures 15/16
and SPEC 4), labels, image-token counts against the encoder, the crop rule through Context,
bad records and the release importer.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import release
import pixels
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
    crop, region = pixels.crop_image(orig, c1.region, c1.display, [112, 0, 224, 84])
    inner = np.asarray(crop)[8:-8, 8:-8].reshape(-1, 3)
    assert (inner == colors[1, 2]).all()  # cut from the original, at that cell
    # and the pixel values the encoder gets are that crop's
    want, _ = pixels.preprocess_image(crop, pixels.MIN_PIXELS, pixels.budget_per_crop())
    assert torch.equal(c2.pixel_values, want)


# -----------------------------------------------------------------------------
# bad input


@pytest.fixture()
def bad_root(tmp_path):
    save(Image.new("RGB", (112, 84), (200, 10, 10)), str(tmp_path / "ok.png"))
    save(Image.new("RGB", (1, 1000), (200, 10, 10)), str(tmp_path / "thin.png"))  # the encoder refuses it
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
    (good(images=["broken.png"]), "images"),  # exists, cannot be read: found at load (its header), not at step N
    (good(images=["thin.png"]), "images"),  # 1x1000: aspect ratio above 200
    (good(problem_type="essay"), "problem_type"),
    (good(max_pixels="big"), "max_pixels"),
    # what a rollout refuses, SFT does not train: 1 + 60 visual inputs; an answer that is an object
    (good(steps=[{"think": "t", "tool": {"region": [{"index": 0, "bbox_2d": [0, 0, 56, 42]}] * 60, "query": "q"}},
                 {"think": "t", "answer": "1"}]), "steps[0].tool.region"),
    (good(steps=[{"think": "t", "answer": {"value": 1}}]), "steps[0].answer"),
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


def tool_step(*regions, **kw):
    """A gold tool-call step naming `regions` ((index, bbox_2d) pairs)."""
    return dict({"think": "t", "tool": {"region": [{"index": i, "bbox_2d": b} for i, b in regions], "query": "q"}},
                **kw)


ANSWER = {"think": "t", "answer": "1"}


@pytest.mark.parametrize("rec, field, budget", [
    # ok.png is 112x84 and displayed so under the default budget
    (good(steps=[tool_step((0, [0, 0, 113, 42])), ANSWER]), "steps[0].tool", Budget()),  # outside the image
    (good(steps=[tool_step((1, [0, 0, 5, 5])), ANSWER]), "steps[0].tool", Budget()),  # no image 1
    (good(steps=[tool_step((0, [0, 0, 0.2, 42])), ANSWER]), "steps[0].tool", Budget()),  # too thin, as the rollout says
    # the crop of [0, 0, 28, 42] is cut at 56x84 (twice its displayed size): [0, 0, 60, 42] fits the
    # original but not that crop, so the crop's size comes from the crop rule, not from its parent
    (good(steps=[tool_step((0, [0, 0, 28, 42])), tool_step((1, [0, 0, 60, 42])), ANSWER]), "steps[1].tool", Budget()),
    # the same box is judged against the display of the run's budget: 56x56 at max_pixels 4,704
    (good(steps=[tool_step((0, [0, 0, 112, 84])), ANSWER]), "steps[0].tool", Budget(max_pixels=56 * 84)),
    # and a record's own max_pixels
    (good(max_pixels=56 * 84, steps=[tool_step((0, [0, 0, 112, 84])), ANSWER]), "steps[0].tool", Budget()),
    # pre-made crop files: missing, too thin to encode, one per region
    (good(steps=[tool_step((0, [0, 0, 56, 42]), crops=["nope.png"]), ANSWER]), "steps[0].crops", Budget()),
    (good(steps=[tool_step((0, [0, 0, 56, 42]), crops=["thin.png"]), ANSWER]), "steps[0].crops", Budget()),
    (good(steps=[tool_step((0, [0, 0, 56, 42]), crops=["ok.png", "ok.png"]), ANSWER]), "steps[0].crops", Budget()),
    # a box on a pre-made crop file is judged against that file's size (ok.png: 112x84)
    (good(steps=[tool_step((0, [0, 0, 56, 42]), crops=["ok.png"]), tool_step((1, [0, 0, 113, 84])), ANSWER]),
     "steps[1].tool", Budget()),
    # text fields the render would stop on: '<image>' placeholders that do not match the images
    (good(steps=[tool_step((0, [0, 0, 56, 42]), observation="<image><image>"), ANSWER]), "steps[0].observation",
     Budget()),
    (good(prompt="<image><image> q?"), "prompt", Budget()),
    (good(question="<image> and <image>: q?"), "question", Budget()),
    (good(prompt=["<image>", "q?"]), "prompt", Budget()),
])
def test_bad_box_or_text_at_load(bad_root, ct, rec, field, budget):
    """Issue 14, item 13: everything but the pixels is checked when the dataset is built, the gold
    boxes against the display sizes the render will judge them on (from the file headers and the
    crop rule's geometry), so a bad line 3 stops SFT before its first step, not at the step that
    first renders it; with skip_bad it is skipped and counted there."""
    path = write_jsonl(bad_root / "d.jsonl", [good(), good(), rec])
    with pytest.raises(RecordError) as e:
        TrajectoryDataset(path, str(bad_root), ct, budget)
    assert f"{path}:3: field '{field}'" in str(e.value)
    logged = []
    ds = TrajectoryDataset(path, str(bad_root), ct, budget, skip_bad=True, log=logged.append)
    assert len(ds) == 2 and ds.n_bad == 1 and f"{path}:3" in logged[0]
    assert ds[0] is not None and ds[1] is not None and ds.n_bad == 1


def test_load_time_sizes_are_the_rendered_ones(zoom_world, bad_root, ct):
    """gold_displays (headers + crop geometry, no pixels) gives every image of a trajectory the
    display size render_sample gives it from the pixels: originals, crops of several images in
    one call, crops of crops (the zoom world's), pre-made crop files, a record's own max_pixels."""
    recs = [(zoom_world["image_root"], zoom_world["budget"], rec) for _, rec in data.read_jsonl(zoom_world["train"])[0]
            if rec.get("mode", "chat") == "chat"]
    assert any(s["tool"]["region"][0]["index"] > 0 for _, _, r in recs for s in r["steps"][1:-1])  # a crop of a crop
    save(Image.new("RGB", (140, 84)), str(bad_root / "crop.png"))
    recs += [(str(bad_root), Budget(), good(steps=[tool_step((0, [0, 0, 28, 42])), tool_step((1, [0, 0, 56, 84])),
                                                   ANSWER])),
             (str(bad_root), Budget(), good(max_pixels=56 * 56, steps=[tool_step((0, [0, 0, 28, 28])), ANSWER])),
             (str(bad_root), Budget(), good(steps=[tool_step((0, [0, 0, 56, 42]), crops=["crop.png"]),
                                                   tool_step((1, [0, 0, 140, 84])), ANSWER]))]
    for root, budget, rec in recs:
        data.check_record(rec, "r", root, need_steps=True, need_answer=False, budget=budget)
        rendered = render_sample(rec, "r", root, ct, budget)["context"].views
        assert data.gold_displays(rec, "r", root, budget) == [v.display for v in rendered]


@pytest.mark.parametrize("gold, ptype", [("about 5", "numerical"), ("Apple", "multiple choice")])
def test_a_gold_the_reward_cannot_score_is_refused_at_load(bad_root, gold, ptype):
    """RL prompts (read with need_answer, as grpo.py does): a numerical gold that is no number, or
    a multiple-choice gold that is option text, stop the load naming file:line and the field (or
    are skipped with skip_bad), instead of the first reward mid-run. Free-form golds score."""
    rec = good(answer=gold, problem_type=ptype, options=["A. Apple", "B. Pear"])
    path = write_jsonl(bad_root / "rl.jsonl", [good(answer="a red car", problem_type="free-form"), rec])
    with pytest.raises(RecordError, match=f"{path}:2: field 'answer'"):
        data.read_jsonl(path, image_root=str(bad_root))
    rows, n_bad = data.read_jsonl(path, skip_bad=True, log=lambda m: None, image_root=str(bad_root))
    assert [w for w, _ in rows] == [f"{path}:1"] and n_bad == 1


def test_sft_caps_crops_at_the_record_max_pixels(bad_root, ct):
    """As the release's SFT did: a record's max_pixels caps its crops, not only its originals
    (a crop may otherwise take the whole 8,192-token budget); sft.py --crop-max-pixels caps all."""
    rec = good(max_pixels=56 * 56, steps=[{"think": "t", "tool": {"region": [{"index": 0, "bbox_2d": [0, 0, 56, 28]}],
                                                                  "query": "q"}}, {"think": "t", "answer": "1"}])
    free = render_sample(dict(rec, max_pixels=None), "r", str(bad_root), ct, Budget())["context"].views[1].display
    capped = render_sample(rec, "r", str(bad_root), ct, Budget())["context"].views[1].display
    flag = render_sample(dict(rec, max_pixels=None), "r", str(bad_root), ct, Budget(crop_max_pixels=56 * 56))
    assert free[0] * free[1] > 56 * 56 >= capped[0] * capped[1]
    assert flag["context"].views[1].display == capped


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
    rec_release = {
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
    rec = release.import_release_record(rec_release, "release.json:1")
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
    want, grid = pixels.preprocess_image(crop_file, pixels.MIN_PIXELS, pixels.budget_per_crop())
    assert torch.equal(crop_view.pixel_values, want) and crop_view.grid_thw.tolist() == [1, 6, 10]
    assert crop_view.region == pytest.approx((0, 0, 0.5, 0.5))
    q = tokenizer.encode("read the number on the sign") + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert s["query_ids"][1, :len(q)].tolist() == q and s["query_mask"][1].sum() == len(q)
    assert s["query_mask"][0].sum() == 0 and s["image_to_query"].tolist() == [0, 1]

    bad = dict(rec_release, image_to_query_mapping=[0])
    with pytest.raises(RecordError, match="release.json:1: field 'image_to_query_mapping'"):
        release.import_release_record(bad, "release.json:1")
    # what the release's format can get wrong, each named by field
    conv = rec_release["conversations"]
    for bad, field in ((dict(rec_release, images=["orig.png"], image_to_query_mapping=[0]), "images"),  # no crop file
                       (dict(rec_release, images=["orig.png", "orig_crop0.png", "spare.png"],
                             image_to_query_mapping=[0, 1, 1]), "images"),  # an image no <image> places
                       (dict(rec_release, conversations=[conv[0], {"from": "human", "value": ["<image>", "Q"]}]),
                        "conversations[1].value")):
        with pytest.raises(RecordError, match=f"release.json:1: field '{re.escape(field)}'"):
            release.import_release_record(bad, "release.json:1")
    # an imported record that fails later (its box outside the image) names the release's record
    broken = release.import_release_record(rec_release, "release.json[7]")
    broken["steps"][0]["tool"]["region"][0]["bbox_2d"] = [0, 0, 500, 42]
    path = write_jsonl(tmp_path / "imported.jsonl", [broken])
    with pytest.raises(RecordError, match=re.escape(f"release.json[7] (imported as {path}:1): field 'steps[0].tool'")):
        TrajectoryDataset(path, str(tmp_path), ct)[0]
