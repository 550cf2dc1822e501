"""
Data: the prompts (the paper's Figures 15/16) and chat rendering, tokens, the images of one
trajectory (originals and crops, by pixels.py's rules), trajectory records and datasets, and a
tiny tokenizer trainer for CPU-sized models (release.py imports the authors' SFT records).
`python data.py RECORDS.jsonl --index N --model DIR` shows one record as the model reads it.

SFT renders whole gold trajectories with these functions and the rollout renders each prompt and
observation with them, so train and inference text cannot drift apart.
"""

import json
import os
import re
from dataclasses import dataclass

import torch
from PIL import Image

from pixels import (MIN_PIXELS, TOTAL_VISUAL_TOKENS, budget_per_crop, budget_per_image, crop_geometry, crop_image,
                    display_of, display_size, image_size, load_image, map_bbox, n_visual_tokens, preprocess_image)
from reward import MAX_ASPECT, MAX_IMAGES, answer_correct, problem_kind, validate_tool_call

# -----------------------------------------------------------------------------
# prompts (the paper's Figures 15 and 16; SPEC section 4)
#
# One set of functions renders prompts, assistant turns and observations. sft.py renders
# whole gold trajectories with them and rollout.py renders the prompt and each observation
# with them, so train and inference text cannot drift apart.

SYSTEM_PROMPT = """You are a helpful assistant. Your goal is to solve the problem in the provided image(s) based on the user's instruction. Proceed step by step, optionally using the zoom-in tool one or more times to examine key areas closely. Selected regions will be cropped and processed externally, then re-encoded with your query to extract critical details.

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

TOOL_FORMAT = ('<think> Your reasoning about where to look and why </think>\n'
               '<tool> {"region": [{"index": int, "bbox_2d": [x1, y1, x2, y2]}, ...], "query": str} </tool>')
ANSWER_FORMAT = "<think> Your reasoning here. </think>\n<answer> Your final answer here. </answer>"
CONTINUE_NOTE = ("Continue your reasoning. To zoom in again, make a tool call in the same format:\n" + TOOL_FORMAT +
                 "\nIf you have enough information to answer the original question:\n" + ANSWER_FORMAT)
FINAL_NOTE = ("You have used all allowed tool calls. No more tool calls are allowed: give your final answer now "
              "in this format:\n" + ANSWER_FORMAT)
# The notes that close Figure 16's user prompt, verbatim (its typo "specfied" included; the
# figure's bold/italic marks are typesetting, like its bold "Question:", and are dropped).
ANSWER_RULES = ("- Note that x1, y1, x2, y2 are the coordinates of the bounding box in the specfied image by the index.\n"
                "- You must strictly follow the above output format.\n"
                "- In <answer>, provide only the final answer in the simplest required form:\n"
                "  - For multiple-choice questions: output only the letter (e.g., A, B, C).\n"
                "  - For yes/no questions: output only Yes or No.\n"
                "  - For numerical answers: output only the number (e.g., 42, 3.14).\n"
                "  - Do not include explanations, units, punctuation, or extra words.")
# The end of Figure 16's user turn: the tool-call and answer formats and the closing notes.
CHAT_INSTRUCTIONS = ("If you need to zoom in for more details or examine specific regions, make tool call following "
                     "the format:\n" + TOOL_FORMAT + "\nIf you have enough information to answer the original "
                     "question:\n" + ANSWER_FORMAT + "\n" + ANSWER_RULES)
# "Thinking about images" (paper Table 1), no tools: Qwen's plain system prompt, and after the
# question the chat prompt's answer format and rules, nothing about tools or boxes. eval.py's
# direct mode; also records with "mode": "direct" (the zoom world's no-tool share).
PLAIN_SYSTEM = "You are a helpful assistant."  # Qwen2.5-VL's default system prompt
DIRECT_INSTRUCTIONS = ("Answer from the image(s) as given: no zoom-in tool is available. Think it through first, "
                       "then give your final answer in this format:\n" + ANSWER_FORMAT + "\n"
                       + "\n".join(r for r in ANSWER_RULES.splitlines() if "bounding box" not in r))

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = IM_START + "assistant\n"
IMAGE = object()  # marker in a list of parts: "the next image block goes here"


def format_question(question, options=None):
    """The question with its options appended one per line (SPEC 8), e.g. 'A. red'."""
    if not options:
        return question
    lines = [o if re.match(r"^\(?[A-Z][.):]", o.strip()) else f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]
    return question + "\n" + "\n".join(lines)


def images_header(displays):
    """Figure 16's lines after the image blocks: how many images (if several), their size."""
    n = len(displays)
    count = f"These are {n} images with indexed from 0 to {n - 1}.\n" if n > 1 else ""
    # Figure 16 states one size for all images; originals of different sizes get one line each.
    if len(set(displays)) == 1:
        (W, H), = set(displays)
        who = "The image has" if n == 1 else "All images have"
        return count + f"{who} size: width {W}, height {H}.\n"
    return count + "".join(f"Image {i} has size: width {W}, height {H}.\n" for i, (W, H) in enumerate(displays))


def prompt_parts(displays, question, system=SYSTEM_PROMPT, user=None, instructions=None):
    """System turn, the user turn (Figure 16) and the assistant header, as text with IMAGE
    markers for the original images. `user` (text with '<image>' placeholders) replaces the
    rendered user turn, for imported records that carry their own.
    A question holding '<image>' placeholders (one per image; benchmarks like ERQA interleave
    images and text) gets each image block, with its index line, at its placeholder instead
    of first (SPEC 8). `instructions` replaces the format instructions after the question
    (eval.py's no-tool mode); None = the tool-call / answer formats and the closing notes of
    Figure 16 (ANSWER_RULES)."""
    parts = [f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n"]
    if instructions is None:
        instructions = CHAT_INSTRUCTIONS
    if user is not None:
        parts += _placeholders(user, len(displays), "user prompt")
    elif "<image>" in question:
        n, k = len(displays), 0
        text = images_header(displays) + "Question: "
        for p in _placeholders(question, n, "question"):
            if p is IMAGE:  # a text piece ends where an image block starts (see "tokens" below)
                if parts[-1] is IMAGE:
                    parts.append(text)
                else:
                    parts[-1] += text
                parts.append(IMAGE)
                text, k = f"The index of the provided image is {k}.\n", k + 1
            else:
                text += p
        parts.append(text + "\n" + instructions)
    else:
        n = len(displays)
        for i in range(n):
            parts += [IMAGE, f"The index of the provided image is {i}.\n"]
        parts.append(images_header(displays) + f"Question: {question}\n" + instructions)
    parts.append(f"{IM_END}\n{ASSISTANT_HEADER}")
    return parts


def observation_parts(first_index, displays, last_round=False, error=None, raw=None):
    """What the environment writes after a tool call (SPEC 4): closes the user turn that holds
    `<tool_response>` + one block per crop + a reminder, and opens the next assistant turn.
    `first_index` is the context index of the first new crop; `error` replaces the crops with
    the reason the call was rejected. The assistant's own <|im_end|> precedes this."""
    parts = [f"\n{IM_START}user\n"]
    if raw is not None:
        parts += _placeholders(raw, len(displays), "observation")
    else:
        parts.append("<tool_response>")
        if error is not None:
            parts.append(f"Error: {error}\n")
        for k, (W, H) in enumerate(displays):
            parts += [IMAGE, f"The index of the zoom-in image is {first_index + k} (width: {W}, height: {H}).\n"]
        parts.append((FINAL_NOTE if last_round else CONTINUE_NOTE) + "</tool_response>")
    parts.append(f"{IM_END}\n{ASSISTANT_HEADER}")
    merged = []  # adjacent text joined ("<tool_response>" + "Error: ..."): a text piece must end at a special token
    for p in parts:
        if p is not IMAGE and merged and merged[-1] is not IMAGE:
            merged[-1] += p
        else:
            merged.append(p)
    return merged


def _placeholders(text, n_images, what):
    pieces = text.split("<image>")
    if len(pieces) - 1 != n_images:
        raise ValueError(f"{what} has {len(pieces) - 1} <image> placeholders for {n_images} images")
    out = [pieces[0]]
    for p in pieces[1:]:
        out += [IMAGE, p]
    return [p for p in out if p != ""]


def record_prompt(rec, mode=None, question=None):
    """A record's prompt as prompt_parts' keyword arguments (question, system, user,
    instructions): the one rule by which SFT (render_sample), GRPO and eval read a record.
    mode: the prompt asked for, "chat" (Figures 15/16) or "direct" (the no-tool prompt);
    default: the record's own (its "mode", chat if absent). A record's own `system` and `prompt`
    belong to its own mode; asked in the other mode, it gets that mode's default prompt.
    question: the question as asked (default: the record's question with its options)."""
    own = rec.get("mode", "chat")
    direct = (mode or own) == "direct"
    system, user = (PLAIN_SYSTEM if direct else SYSTEM_PROMPT), None
    if (mode or own) == own:
        system, user = rec.get("system", system), rec.get("prompt")
    if question is None:
        question = format_question(rec["question"], rec.get("options"))
    return dict(question=question, system=system, user=user, instructions=DIRECT_INSTRUCTIONS if direct else None)


def assistant_text(step):
    """A gold step as the assistant writes it: <think> then <tool>{json}</tool> or <answer>."""
    if "text" in step:  # imported records keep the release's exact text
        return step["text"]
    if "tool" in step:
        return f"<think> {step['think']} </think>\n<tool> {json.dumps(step['tool'])} </tool>"
    return f"<think> {step['think']} </think>\n<answer> {step['answer']} </answer>"


# -----------------------------------------------------------------------------
# tokens
#
# Sequences are built piece by piece: text pieces go through the tokenizer (which maps
# <|im_start|> etc. to their ids), image blocks are written as ids. A piece always ends at a
# special token, so this equals tokenizing the whole text at once, and the rollout, which
# appends the same pieces after generated tokens, produces exactly the ids SFT trains on.


class ChatTokenizer:
    """The LM tokenizer plus the inquiry tokenizer (Qwen3-Embedding's), with the special ids."""

    def __init__(self, tokenizer, query_tokenizer=None, max_query_tokens=50):
        self.tok = tokenizer
        self.qtok = query_tokenizer or tokenizer
        self.max_query_tokens = max_query_tokens
        ids = {}
        for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", IM_START, IM_END, "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(t)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no special token {t}")
            ids[t] = i
        self.vision_start, self.vision_end = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_pad, self.im_start, self.im_end = ids["<|image_pad|>"], ids[IM_START], ids[IM_END]
        self.query_eos = self.qtok.convert_tokens_to_ids("<|endoftext|>")
        self.eos_ids = (self.im_end, ids["<|endoftext|>"])  # either ends an assistant turn

    @classmethod
    def load(cls, model_dir, cfg, embedder_dir=None):
        """The tokenizers of a model folder (see load_tokenizers) for a model of config cfg."""
        return cls(*load_tokenizers(model_dir, embedder_dir, need_query=cfg.inquiry is not None),
                   cfg.inquiry.max_tokens if cfg.inquiry is not None else 50)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def image_block(self, n_tokens):
        return [self.vision_start] + [self.image_pad] * n_tokens + [self.vision_end]

    def encode_parts(self, parts, n_tokens):
        """parts: text and IMAGE markers; n_tokens: LM tokens of each image, in order."""
        ids, k = [], 0
        for p in parts:
            if p is IMAGE:
                ids += self.image_block(n_tokens[k])
                k += 1
            else:
                ids += self.encode(p)
        assert k == len(n_tokens), f"{len(n_tokens)} images for {k} IMAGE markers"
        return ids

    def render_parts(self, parts, n_tokens):
        """The same sequence as text (image blocks expanded): what the model reads."""
        it = iter(n_tokens)
        return "".join("<|vision_start|>" + "<|image_pad|>" * next(it) + "<|vision_end|>" if p is IMAGE else p
                       for p in parts)

    def queries(self, texts):
        """Inquiry tokens (n, L), RIGHT padded, and their mask (SPEC 2): at most
        max_query_tokens including the appended <|endoftext|>; '' contributes no tokens."""
        rows = []
        for t in texts:
            ids = self.qtok.encode(t, add_special_tokens=False)[: self.max_query_tokens - 1] if t else []
            rows.append(ids + [self.query_eos] if t else [])
        L = max([1] + [len(r) for r in rows])
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask


def load_tokenizers(model_dir, embedder_dir=None, need_query=True):
    """(LM tokenizer, inquiry tokenizer) of a model folder. The inquiry (Qwen3-Embedding)
    tokenizer comes from model_dir/query_tokenizer/ (our checkpoints save it there), else from
    the embedder folder; the vanilla model (need_query=False) has no inquiry path and reuses the
    LM tokenizer. transformers is our tokenizer library (its modeling code is never used)."""
    tok = _tokenizer(model_dir)
    qdir = os.path.join(model_dir, "query_tokenizer")
    qdir = qdir if os.path.isdir(qdir) else embedder_dir
    if qdir is None:
        if need_query:
            raise FileNotFoundError(f"{model_dir}: no query_tokenizer/ folder and no embedder folder given: pass the "
                                    "Qwen3-Embedding folder (--embedder) for the inquiry tokenizer")
        return tok, tok
    return tok, _tokenizer(qdir)


def _tokenizer(folder):
    """transformers' AutoTokenizer on a folder that must hold tokenizer.json (the fast tokenizer's
    one file); any failure to read it is an error naming the folder, not transformers' guess
    (for a ViLaVT folder without tokenizer files it suggests upgrading transformers)."""
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(f"{folder}: no tokenizer.json (the tokenizer files are missing from this folder)")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001: transformers raises many kinds for a bad file
        raise ValueError(f"{folder}: unreadable tokenizer files ({type(e).__name__}: {str(e)[:200]})") from None


# -----------------------------------------------------------------------------
# the images of one trajectory


@dataclass
class View:
    """One image in a trajectory's context: an original (or video frame), or a crop."""
    source: int  # which original file it comes from
    region: tuple  # normalised (x1, y1, x2, y2) of that original
    pixel_values: torch.Tensor  # (h*w, 1176)
    grid_thw: torch.Tensor  # (3,) = [1, h, w] in patches
    group: int  # encoder group: originals alone, each tool call's crops together
    bbox: list = None  # for crops: the bbox and the index of the image it was drawn on
    parent: int = None

    @property
    def display(self):
        return display_size(self.grid_thw)

    @property
    def n_tokens(self):
        return n_visual_tokens(self.grid_thw)


# the keys of Context.encoder_inputs: what the vision encoder takes for a trajectory's images
ENCODER_KEYS = ("pixel_values", "grid_thw", "image_to_query", "query_ids", "query_mask")


@dataclass(frozen=True)
class Initial:
    """How a sample's originals are encoded before the first turn: Eq. 1's f_0 = V(I, q_0).
    The default is the paper's pipeline and the release's: each original its own group, no
    inquiry. Section 4.4 (footnote 2, Figure 4) also encodes the whole visual input in one pass:
    all originals in one group (`joint`: they attend to each other in the query-aware layers),
    the question as the inquiry (`inquiry`), or both. The vanilla encoder has neither path, so
    there both switches change nothing. sft.py, grpo.py and eval.py take them as
    --initial-groups/--initial-inquiry (add_args), rollout.Prompt as its `initial`."""
    joint: bool = False  # all originals in one encoder group, else one group each
    inquiry: bool = False  # the question (without its options) is the originals' inquiry, else ''

    def context(self, question):
        """Context's keyword arguments for a sample whose question is `question`."""
        return dict(joint=self.joint, inquiry=question if self.inquiry else "")

    @staticmethod
    def add_args(ap):
        ap.add_argument("--initial-groups", choices=("per-image", "joint"), default="per-image",
                        help="encoder groups of the original images: one each (the paper's pipeline) or all in "
                             "one (section 4.4's single pass)")
        ap.add_argument("--initial-inquiry", choices=("none", "question"), default="none",
                        help="the originals' inquiry: none (the paper's pipeline) or the question (section 4.4)")

    @classmethod
    def from_args(cls, a):
        return cls(joint=a.initial_groups == "joint", inquiry=a.initial_inquiry == "question")


class Context:
    """Originals and crops of one trajectory in index order, with their encoder groups and the
    inquiry of each group. Crops follow the SPEC 3 crop rule. The originals are one group each
    with inquiry '' (Initial's default), or one group (joint), and `inquiry` is theirs."""

    def __init__(self, originals, max_pixels, crop_max_pixels=None, min_pixels=MIN_PIXELS, joint=False, inquiry=""):
        self.originals = originals  # full-resolution PIL images
        self.crop_max_pixels = crop_max_pixels or budget_per_crop()
        self.min_pixels = min_pixels
        self.views, self.queries = [], []
        for i, img in enumerate(originals):
            pv, grid = preprocess_image(img, min_pixels, max_pixels)
            self.views.append(View(i, (0.0, 0.0, 1.0, 1.0), pv, grid, group=0 if joint else i))
        self.queries = [inquiry] * (1 if joint else len(originals))

    @classmethod
    def of(cls, originals, budget, max_pixels=None, initial=Initial(), question=""):
        """The images of a trajectory under the one sizing rule of SFT, GRPO and eval (caps),
        its originals grouped as `initial` says for a sample asking `question`."""
        return cls(originals, *cls.caps(len(originals), budget, max_pixels), **initial.context(question))

    @staticmethod
    def caps(n_originals, budget, max_pixels=None):
        """(max_pixels of each original, max_pixels of each crop, min_pixels) of a trajectory: a
        record's own max_pixels caps every image of it, originals and crops (as the release's SFT
        capped every image of a record); otherwise the budget's shares (SPEC 3). Context.of and
        the load-time box check (gold_displays) size images by it."""
        return (max_pixels or budget.for_originals(n_originals),
                min(budget.for_crops(), max_pixels) if max_pixels else budget.for_crops(), budget.min_pixels)

    def zoom(self, call, crop_files=None):
        """Apply a (validated) tool call: one new group holding its crops, encoded with its
        query. crop_files: pre-made crop images (imported release data) used instead of
        cutting them. Returns the new views. Raises ValueError naming a bad index or bbox."""
        group, new = len(self.queries), []
        for j, r in enumerate(call["region"]):
            idx = r["index"]
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(self.views):
                raise ValueError(f"region index {idx!r} is not an image index 0..{len(self.views) - 1}")
            parent = self.views[idx]
            if crop_files is not None and len(crop_files) != len(call["region"]):
                raise ValueError(f"{len(crop_files)} crop files for {len(call['region'])} regions")
            if crop_files is not None:
                region, img = map_bbox(parent.region, parent.display, r["bbox_2d"]), crop_files[j]
            else:
                img, region = crop_image(self.originals[parent.source], parent.region, parent.display, r["bbox_2d"])
            pv, grid = preprocess_image(img, self.min_pixels, self.crop_max_pixels)
            new.append(View(parent.source, region, pv, grid, group, list(r["bbox_2d"]), idx))
        self.views += new
        self.queries.append(call["query"])
        return new

    def encoder_inputs(self, views, ct):
        """Inputs of the vision encoder for `views` (a contiguous run of whole groups):
        pixel_values, grid_thw, image_to_query renumbered from 0, and the groups' inquiries."""
        groups = sorted({v.group for v in views})
        remap = {g: i for i, g in enumerate(groups)}
        qids, qmask = ct.queries([self.queries[g] for g in groups])
        return dict(pixel_values=torch.cat([v.pixel_values for v in views]),
                    grid_thw=torch.stack([v.grid_thw for v in views]),
                    image_to_query=torch.tensor([remap[v.group] for v in views]),
                    query_ids=qids, query_mask=qmask)

    @staticmethod
    def merge_encoder_inputs(encs):
        """Several encoder_inputs (e.g. of different prompts) as one encoder call: groups are
        renumbered to stay distinct and the inquiries padded to one width (right padding)."""
        L = max(e["query_ids"].shape[1] for e in encs)
        pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))
        offsets = [0]
        for e in encs:
            offsets.append(offsets[-1] + e["query_ids"].shape[0])
        return dict(pixel_values=torch.cat([e["pixel_values"] for e in encs]),
                    grid_thw=torch.cat([e["grid_thw"] for e in encs]),
                    image_to_query=torch.cat([e["image_to_query"] + o for e, o in zip(encs, offsets)]),
                    query_ids=torch.cat([pad(e["query_ids"]) for e in encs]),
                    query_mask=torch.cat([pad(e["query_mask"]) for e in encs]))


def unique_groups(enc):
    """Merged encoder inputs with each repeated group kept once (the same images, grids and
    inquiry: the originals that a prompt's G rollouts share, encoded G times otherwise), plus
    image_index (n_images,): for each image of `enc`, in order, its image among those kept, for
    model.encode_images to copy the features back to every use. Exact: a group's features do not
    depend on the other groups, and the gradient of a shared group sums over its uses."""
    sizes = enc["grid_thw"].prod(-1).tolist()
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    groups = {}  # group number -> its images, in order (a group's images are contiguous)
    for i, g in enumerate(enc["image_to_query"].tolist()):
        groups.setdefault(g, []).append(i)
    pv = enc["pixel_values"]
    kept, index, images, seen = [], [None] * len(sizes), [], {}
    for g, imgs in groups.items():
        pix = pv[starts[imgs[0]]:starts[imgs[-1] + 1]]
        q = enc["query_ids"][g][enc["query_mask"][g].bool()]
        key = (tuple(map(tuple, enc["grid_thw"][imgs].tolist())), tuple(q.tolist()),
               float(pix.sum(dtype=torch.float64)))  # a fingerprint: equality is checked below
        twin = seen.get(key)
        if twin is not None and torch.equal(pix, pv[starts[groups[twin][0]]:starts[groups[twin][-1] + 1]]):
            for i, j in zip(imgs, groups[twin]):
                index[i] = index[j]
            continue
        seen[key] = g
        kept.append(g)
        for i in imgs:
            index[i] = len(images)
            images.append(i)
    keep, renumber = torch.tensor(images), {g: k for k, g in enumerate(kept)}
    return dict(pixel_values=torch.cat([pv[starts[i]:starts[i + 1]] for i in images]),
                grid_thw=enc["grid_thw"][keep],
                image_to_query=torch.tensor([renumber[g] for g in enc["image_to_query"][keep].tolist()]),
                query_ids=enc["query_ids"][kept], query_mask=enc["query_mask"][kept],
                image_index=torch.tensor(index))


# -----------------------------------------------------------------------------
# trajectory records (JSONL; the schema is documented in the README)

class RecordError(ValueError):
    """A bad record: the message names the file:line and the field."""


@dataclass
class Budget:
    """Visual-token budgets (SPEC 3), all configurable."""
    total_tokens: int = TOTAL_VISUAL_TOKENS  # shared evenly by the initial images of a sample
    max_pixels: int | None = None  # per initial image; None = total budget / n_images
    crop_max_pixels: int | None = None  # per crop; None = the full budget
    min_pixels: int = MIN_PIXELS
    max_frames: int = 32  # video: frames sampled uniformly

    def for_originals(self, n):
        return self.max_pixels or budget_per_image(n, self.total_tokens)

    def for_crops(self):
        return self.crop_max_pixels or budget_per_crop(self.total_tokens)


def _fail(where, field, msg):
    raise RecordError(f"{where}: field '{field}': {msg}")


def image_paths(rec, max_frames=32):
    """The original images of a record; a video ("video": frame paths) is sampled uniformly."""
    if "video" in rec:
        frames = rec["video"]
        n = min(len(frames), max_frames)
        return [frames[round(i * (len(frames) - 1) / max(1, n - 1))] for i in range(n)]
    return rec["images"]


def max_pixels_error(mp):
    """Why a record's max_pixels cannot be used (None if absent or fine): records and benchmarks alike."""
    if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < MIN_PIXELS):
        return f"must be an int >= {MIN_PIXELS} (pixels per original image), got {mp!r}"
    return None


def prompt_error(rec, n_images, question=None):
    """(field, reason) if the record's own prompt cannot be rendered for its n_images originals
    (a `system` or `prompt` that is no string; '<image>' placeholders of its `prompt`, or of a
    question that places its images, that do not match them), else None. It renders the prompt
    (record_prompt and prompt_parts, the rule SFT, GRPO and eval read records by; text only, the
    sizes are dummies), so it is the check the first rendering would make, done at load.
    question: as record_prompt's (eval asks its own rendering of the question)."""
    for k in ("system", "prompt"):
        if k in rec and not isinstance(rec[k], str):
            return k, "must be a string"
    try:
        prompt_parts([(0, 0)] * n_images, **record_prompt(rec, question=question))
    except ValueError as e:
        return ("prompt" if "prompt" in rec else "question"), str(e)
    return None


def check_record(rec, where, image_root=None, need_steps=False, need_answer=True, budget=None):
    """Validate a record's fields: its schema, its prompt's '<image>' placeholders, and with
    image_root its image files' headers (exist, readable, aspect). Raises RecordError naming
    the field. budget: the budget its gold steps will be rendered under (SFT); given with
    image_root, every gold tool call is judged now as rendering will judge it (gold_displays),
    so only the pixel decoding is left for later. GRPO and eval, which never render the gold
    steps, do not judge their boxes (their own budget need not be the one they were drawn for)."""
    if not isinstance(rec, dict):
        _fail(where, "<record>", f"expected a JSON object, got {type(rec).__name__}")
    key = "video" if "video" in rec else "images"
    paths = rec.get(key)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        _fail(where, key, "must be a non-empty list of image paths")
    if not isinstance(rec.get("question"), str):
        _fail(where, "question", "must be a string")
    if rec.get("options") is not None and not (isinstance(rec["options"], list)
                                               and all(isinstance(o, str) for o in rec["options"])):
        _fail(where, "options", "must be a list of strings or null")
    if need_answer or "problem_type" in rec:
        try:
            problem_kind(rec.get("problem_type"))  # the one definition of the problem types (reward.py)
        except ValueError as e:
            _fail(where, "problem_type", str(e))
    if need_answer and not isinstance(rec.get("answer"), (str, int, float)):
        _fail(where, "answer", "missing (string or number)")
    if need_answer:  # a gold the reward cannot score would stop GRPO at its first reward, mid-run
        try:
            answer_correct(str(rec["answer"]), rec["answer"], rec["problem_type"])
        except ValueError as e:
            _fail(where, "answer", f"the reward cannot score it: {e}")
    if rec.get("mode", "chat") not in ("chat", "direct"):
        _fail(where, "mode", f"{rec['mode']!r} is not 'chat' or 'direct'")
    if max_pixels_error(rec.get("max_pixels")):
        _fail(where, "max_pixels", max_pixels_error(rec["max_pixels"]))
    mt = 0 if rec.get("mode") == "direct" else rec.get("max_tool_calls", 5)
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 0:
        _fail(where, "max_tool_calls", f"must be a non-negative int, got {mt!r}")
    if image_root is not None:  # every file's header now, so a bad one stops the run before its first step
        for p in paths:
            f = os.path.join(image_root, p)
            try:
                w, h = image_size(f)
            except (OSError, ValueError) as e:
                _fail(where, key, str(e))
            if max(w, h) > MAX_ASPECT * min(w, h):
                _fail(where, key, f"{f} is {w}x{h}: aspect ratio above {MAX_ASPECT}, the encoder cannot take it")
    max_frames = (budget or Budget()).max_frames
    bad_prompt = prompt_error(rec, len(image_paths(rec, max_frames)))
    if bad_prompt:
        _fail(where, *bad_prompt)
    steps = rec.get("steps")
    if need_steps or steps is not None:
        if not isinstance(steps, list) or not steps:
            _fail(where, "steps", "must be a non-empty list")
        n_images = len(image_paths(rec))
        for k, s in enumerate(steps):
            f = f"steps[{k}]"
            last = k == len(steps) - 1
            if not isinstance(s, dict):
                _fail(where, f, "must be an object")
            if "text" in s and not isinstance(s["text"], str):
                _fail(where, f + ".text", "must be a string")
            if "text" not in s and not isinstance(s.get("think"), str):
                _fail(where, f + ".think", "must be a string")
            if last and "answer" not in s:
                _fail(where, f, "the last step must hold the final 'answer'")
            if not last and not isinstance(s.get("tool"), dict):
                _fail(where, f + ".tool", "every step but the last must be a tool call")
            if not last:
                t = s["tool"]
                if not isinstance(t.get("region"), list) or not t["region"] or not all(
                        isinstance(r, dict) and "index" in r and "bbox_2d" in r for r in t["region"]):
                    _fail(where, f + ".tool.region", "must be a non-empty list of {index, bbox_2d}")
                if not isinstance(t.get("query"), str) or not t["query"].strip():
                    _fail(where, f + ".tool.query", "must be a non-empty string")
                n_images += len(t["region"])
                if n_images > MAX_IMAGES:  # the rollout's cap: SFT does not train what a rollout refuses
                    _fail(where, f + ".tool.region", f"too many images: at most {MAX_IMAGES} visual inputs per "
                                                     "conversation, as in the rollout")
                crops = s.get("crops")  # pre-made crop files (imported release records), one per region
                if "crops" in s and not (isinstance(crops, list) and len(crops) == len(t["region"])
                                         and all(isinstance(c, str) for c in crops)):
                    _fail(where, f + ".crops", f"must be a list of {len(t['region'])} paths, one per region")
                if "observation" in s:  # the release's verbatim observation: one <image> per crop
                    if not isinstance(s["observation"], str):
                        _fail(where, f + ".observation", "must be a string")
                    try:
                        _placeholders(s["observation"], len(t["region"]), "observation")
                    except ValueError as e:
                        _fail(where, f + ".observation", str(e))
            elif isinstance(s.get("answer"), bool) or not isinstance(s.get("answer"), (str, int, float)):
                _fail(where, f + ".answer", f"must be a string or a number, got {s.get('answer')!r}")
        if len(steps) - 1 > mt:
            _fail(where, "steps", f"{len(steps) - 1} tool calls exceed max_tool_calls={mt}")
        if budget is not None and image_root is not None:
            gold_displays(rec, where, image_root, budget)
    return rec


def original_displays(rec, image_root, budget):
    """(file sizes, display sizes) of a record's originals, (W, H) each, from the files' headers
    alone: the sizes Context.of gives them (Context.caps, then preprocess_image's resize)."""
    sizes = [image_size(os.path.join(image_root, p)) for p in image_paths(rec, budget.max_frames)]
    orig_max, _, min_pixels = Context.caps(len(sizes), budget, rec.get("max_pixels"))
    return sizes, [display_of(s, min_pixels, orig_max) for s in sizes]


def gold_displays(rec, where, image_root, budget):
    """The display sizes (W, H) of every image of a gold trajectory, originals then crops, from
    the files' headers and the crop rule's geometry alone (no pixel is decoded), with each gold
    tool call judged on the way as render_sample and the rollout judge it
    (reward.validate_tool_call against the sizes of the images it may name). So a bad box on
    line 10 stops SFT at load, naming file:line and the field, not at the step that renders it.
    Sizes follow Context: Context.caps for the budgets, pixels.display_of (preprocess_image's
    resize) for every image, pixels.crop_geometry (crop_image's rule) for the crops cut on the
    fly, the header of a pre-made crop file. The record's schema must have been checked."""
    originals, displays = original_displays(rec, image_root, budget)
    _, crop_max, min_pixels = Context.caps(len(originals), budget, rec.get("max_pixels"))
    views = [(i, (0.0, 0.0, 1.0, 1.0), d) for i, d in enumerate(displays)]
    for k, s in enumerate(rec["steps"][:-1]):  # the last step's answer makes no call
        error = validate_tool_call(s["tool"], [v[2] for v in views])
        if error is not None:
            _fail(where, f"steps[{k}].tool", error)
        new = []
        for j, r in enumerate(s["tool"]["region"]):
            source, region, display = views[r["index"]]
            if "crops" in s:  # its pre-made file is what gets encoded: that file's size
                try:
                    size = display_of(image_size(os.path.join(image_root, s["crops"][j])), min_pixels, crop_max)
                except (OSError, ValueError) as e:
                    _fail(where, f"steps[{k}].crops", str(e))
                new.append((source, map_bbox(region, display, r["bbox_2d"]), size))
                continue
            try:
                crop_region, size = crop_geometry(originals[source], region, display, r["bbox_2d"])
                new.append((source, crop_region, display_of(size, min_pixels, crop_max)))
            except ValueError as e:
                _fail(where, f"steps[{k}].tool", str(e))
        views += new
    return [v[2] for v in views]


def read_jsonl(path, skip_bad=False, log=print, **check):
    """[(where, record)] of a JSONL file; where = 'file:line'. Malformed JSON or a bad record
    raises RecordError, or with skip_bad is logged and counted (returned as n_bad)."""
    out, n_bad = [], 0
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: malformed JSON ({e})") from None
                if isinstance(rec, dict) and isinstance(rec.get("source"), str):  # an imported record
                    where = f"{rec['source']} (imported as {where})"
                out.append((where, check_record(rec, where, **check)))
            except RecordError as e:
                if not skip_bad:
                    raise
                n_bad += 1
                log(f"skipping bad record: {e}")
    return out, n_bad


def load_originals(rec, where, image_root, max_frames=32):
    imgs = []
    key = "video" if "video" in rec else "images"
    for p in image_paths(rec, max_frames):
        try:
            imgs.append(load_image(os.path.join(image_root, p)))
        except (OSError, ValueError) as e:
            raise RecordError(f"{where}: field '{key}': {e}") from None
    return imgs


def render_sample(rec, where, image_root, ct, budget=Budget(), initial=Initial()):
    """A gold trajectory -> training tensors (paper Eq. 4):

    input_ids, labels (T,): labels are -100 except the assistant's own tokens, each
    assistant <|im_end|> included (the release also trained the '\\n' after it; we do not);
    pixel_values, grid_thw, image_to_query, query_ids, query_mask: every image and crop of the
    trajectory for the dynamic encoder; text: the sequence as the model reads it.
    Crops are cut on the fly by the crop rule unless the record carries pre-made ones. A record's
    own max_pixels caps its originals and its crops (Context.of); `initial` groups the originals."""
    originals = load_originals(rec, where, image_root, budget.max_frames)
    ctx = Context.of(originals, budget, rec.get("max_pixels"), initial, rec["question"])
    ids, labels, text = [], [], []

    def env(parts, views):
        n = [v.n_tokens for v in views]
        x = ct.encode_parts(parts, n)
        ids.extend(x), labels.extend([-100] * len(x)), text.append(ct.render_parts(parts, n))

    def policy(s):
        x = ct.encode(s) + [ct.im_end]
        ids.extend(x), labels.extend(x), text.append(s + IM_END)

    try:
        parts = prompt_parts([v.display for v in ctx.views], **record_prompt(rec))
    except ValueError as e:  # '<image>' placeholders that do not match the images
        raise RecordError(f"{where}: field '{'prompt' if 'prompt' in rec else 'question'}': {e}") from None
    env(parts, ctx.views)
    steps, mt = rec["steps"], rec.get("max_tool_calls", 5)
    for k, step in enumerate(steps):
        policy(assistant_text(step))
        if "tool" not in step or k == len(steps) - 1:
            continue
        crops = None
        if "crops" in step:
            try:
                crops = [load_image(os.path.join(image_root, p)) for p in step["crops"]]
            except (OSError, ValueError) as e:
                raise RecordError(f"{where}: field 'steps[{k}].crops': {e}") from None
        try:  # judged as the rollout judges a call (reward.validate_tool_call), then cut
            error = validate_tool_call(step["tool"], [v.display for v in ctx.views])
            if error is not None:
                raise ValueError(error)
            new = ctx.zoom(step["tool"], crops)
        except ValueError as e:
            raise RecordError(f"{where}: field 'steps[{k}].tool': {e}") from None
        try:
            parts = observation_parts(len(ctx.views) - len(new), [v.display for v in new], last_round=k + 1 == mt,
                                      raw=step.get("observation"))
        except ValueError as e:
            raise RecordError(f"{where}: field 'steps[{k}].observation': {e}") from None
        env(parts, new)
    enc = ctx.encoder_inputs(ctx.views, ct)
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), text="".join(text), context=ctx, **enc)


class TrajectoryDataset:
    """Gold trajectories of a JSONL file, checked whole at construction (fields, image headers,
    every gold box against the sizes it will be judged on: check_record with the budget), and
    rendered on access, when the pixels are decoded and the crops cut."""

    def __init__(self, path, image_root, ct, budget=Budget(), skip_bad=False, log=print, initial=Initial()):
        self.image_root, self.ct, self.budget, self.skip_bad, self.log = image_root, ct, budget, skip_bad, log
        self.initial = initial
        self.records, self.n_bad = read_jsonl(path, skip_bad, log, image_root=image_root, need_steps=True,
                                              need_answer=False, budget=budget)
        if not self.records:
            raise RecordError(f"{path}: no usable records")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        """The rendered sample, or None for a bad one when skip_bad (counted in n_bad): after the
        checks at load, only pixels that fail to decode can make a record bad here."""
        where, rec = self.records[i]
        try:
            return render_sample(rec, where, self.image_root, self.ct, self.budget, self.initial)
        except RecordError as e:
            if not self.skip_bad:
                raise
            self.n_bad += 1
            self.log(f"skipping bad record: {e}")
            return None


# -----------------------------------------------------------------------------
# CLI: show one record as the model sees it


def show_record(path, index, image_root, ct, out_dir, budget=Budget()):
    """Render record `index` of a JSONL file like SFT does and write out_dir/trajectory.txt (the
    token sequence as text, image-pad runs shortened to one marker with their count),
    out_dir/images.txt and out_dir/image_K.png for every image K of the trajectory at the size
    the encoder gets it (originals at their display size, crops cut by the crop rule).
    Returns (text, one line per image, sequence length, trained tokens)."""
    rows, _ = read_jsonl(path, image_root=image_root, need_steps=True, need_answer=False, budget=budget)
    where, rec = rows[index]
    s = render_sample(rec, where, image_root, ct, budget)
    ctx = s["context"]
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for k, v in enumerate(ctx.views):
        if v.parent is None:
            img = ctx.originals[v.source]
        else:
            parent = ctx.views[v.parent]
            img, _ = crop_image(ctx.originals[v.source], parent.region, parent.display, v.bbox)
        img.resize(v.display, Image.Resampling.BICUBIC).save(os.path.join(out_dir, f"image_{k}.png"))
        what = "original" if v.parent is None else f"crop of image {v.parent}, bbox_2d {v.bbox}"
        lines.append(f"image_{k}.png: {what}; {v.display[0]}x{v.display[1]} px, {v.n_tokens} visual tokens, "
                     f"encoder group {v.group}, inquiry {ctx.queries[v.group]!r}")
    text = re.sub(r"(<\|image_pad\|>)+", lambda m: f"<|image_pad|>x{len(m.group(0)) // len('<|image_pad|>')}",
                  s["text"])
    n_train = int((s["labels"] != -100).sum())
    with open(os.path.join(out_dir, "trajectory.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "images.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return text, lines, len(s["input_ids"]), n_train


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Show one trajectory record as the model sees it (text + images)")
    ap.add_argument("records", help="a JSONL file of our schema, e.g. the zoom world's out/zoom/train.jsonl")
    ap.add_argument("--index", type=int, default=0, help="which record (0-based, default 0)")
    ap.add_argument("--image-root", help="default: the records' folder")
    ap.add_argument("--model", required=True, help="model folder whose tokenizers render the text (e.g. out/tiny-base)")
    ap.add_argument("--out", default="out/example", help="folder for trajectory.txt, images.txt, image_K.png")
    a = ap.parse_args()
    root = a.image_root or os.path.dirname(os.path.abspath(a.records))
    qdir = os.path.join(a.model, "query_tokenizer")
    ct = ChatTokenizer(*load_tokenizers(a.model, need_query=os.path.isdir(qdir)))
    text, lines, n, n_train = show_record(a.records, a.index, root, ct, a.out)
    print(text + "\n\n" + "\n".join(lines) + f"\n\n{n} tokens, {n_train} trained (the assistant's); "
          f"written to {a.out}/")
