"""
Parsing of assistant turns and the outcome reward of ViLaVT (paper sec. 3.4, Eq. 5).

An assistant turn is `<think>...</think>` followed by exactly one of
    <tool>{"region": [{"index": int, "bbox_2d": [x1, y1, x2, y2]}, ...], "query": str}</tool>
    <answer>...</answer>
(paper Figs. 15-16, SPEC 4). The reward of a whole trajectory tau is (Eq. 5)

    R(tau) = 1[R_correct > 0] * (R_correct + R_format)

R_correct is read off the LAST `<answer>` of the final turn: option-letter match for
multiple choice, normalised exact match for yes/no, and the paper's Mean Relative Accuracy
for numbers. R_format is 1 iff every turn is well formed and every tool call is valid.

Two MRAs live here on purpose (SPEC 8):
  mra          the paper's formula: theta in {0.50, ..., 0.95}, strict <, exact.  -> rewards
  mra_vsibench what VSI-Bench's public scoring code computes: 10 thresholds, <=,
               numpy float64 arithmetic reproduced bit for bit.                   -> eval.py
They disagree on ordinary pairs (pred 11, gold 10: 0.8 vs 0.9; pred 15, gold 10: 0 vs 0.1),
so benchmark scores must use the benchmark's own one to be comparable with published tables.
NOTE: SPEC 8 says the benchmark code uses linspace(0.5, 0.95, 11) (7/11 for pred 12, gold
10). It does not: it asks for int((0.95 - 0.5) / 0.05 + 2) points, and in floats that is
int(10.999999999999998) = 10. Its float thresholds then make pred 12, gold 10 score 0.6
(1 - 0.8 = 0.19999999999999996 < 0.2), the same as the paper's formula.

Decisions where the paper and SPEC are silent (each is tested in tests/test_reward.py):
  - Only whitespace may stand outside the tags of a turn; any other text makes the turn
    malformed. The caller passes the decoded turn without special tokens (no <|im_end|>).
  - Tags are exact and lowercase. Every literal `<think>`, `</tool>`, ... counts as a tag,
    even inside another block or inside a JSON string, so a turn that mentions a tag in
    its reasoning is malformed (the model never needs to write one).
  - A turn with more than one <answer> block is malformed (format 0) but, as SPEC 5 asks,
    the LAST one is still the answer that is scored.
  - Tool-call JSON may carry extra keys (ignored); bbox numbers may be ints or finite
    floats (the prompt asks for integers, SPEC 3 only for numbers); NaN/Infinity are not
    JSON and are rejected.
  - Numbers: the first whitespace-separated word of the answer, trailing periods dropped
    (like VSI-Bench's fuzzy matching), must be a plain decimal number: "42", "-2", "3.14",
    ".5", "1e3", "1,234" (thousands commas). So "42 meters" -> 42 but "3.5m", "about 4",
    "three", "1/2" and "3,5" -> not a number (scores 0). The paper's mra compares exact
    decimal values (fractions.Fraction), so its threshold edges carry no float error
    (mra_vsibench keeps the reference code's float64 edges on purpose).
  - Option letters: see mc_letter.
"""

import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction

# -----------------------------------------------------------------------------
# Parsing one assistant turn

_TAG = re.compile(r"<(/?)(think|tool|answer)>")


@dataclass
class Turn:
    """One parsed assistant turn. Fields are filled best-effort even when the turn is
    malformed; `error` (None iff the turn follows the template) is what callers check."""
    think: str | None = None      # content of the <think> block, stripped
    tool: dict | None = None      # the parsed tool-call JSON object
    answer: str | None = None     # content of the last <answer> block, stripped
    error: str | None = None      # why the turn is malformed


def extract_answer(turn_text: str) -> str | None:
    """Content of the LAST closed `<answer>...</answer>` (stripped), or None.

    There is deliberately no fallback to the whole text: the release scored the raw turn
    when no <answer> was found, which rewards answering without the format (SPEC 5).
    The last </answer> is paired with the last <answer> before it, so in
    "<answer>a<answer>b</answer>" the answer is "b".
    """
    if not isinstance(turn_text, str):
        return None
    close = turn_text.rfind("</answer>")
    if close < 0:
        return None
    start = turn_text.rfind("<answer>", 0, close)
    if start < 0:
        return None
    return turn_text[start + len("<answer>"):close].strip()


def _reject_constant(name):
    # json.loads accepts NaN / Infinity / -Infinity by default; they are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def _parse_tool_json(body):
    """(dict, None) or (None, reason). json.loads only: the model's text is never eval'd."""
    try:
        call = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        return None, f"tool call is not valid JSON ({str(e)[:80]})"
    if not isinstance(call, dict):
        return None, "tool call is not a JSON object"
    return call, None


def _scan_blocks(text):
    """Split text into top-level (tag, content) blocks. Returns (blocks, error): blocks
    found before the first problem, and a reason for that problem or None."""
    blocks, pos, open_tag, open_end = [], 0, None, 0
    for m in _TAG.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if open_tag is None:
            if closing:
                return blocks, f"</{name}> without a matching <{name}>"
            if text[pos:m.start()].strip():
                return blocks, f"text outside the tags before <{name}>"
            open_tag, open_end = name, m.end()
        elif closing and name == open_tag:
            blocks.append((name, text[open_end:m.start()]))
            open_tag, pos = None, m.end()
        elif closing:
            return blocks, f"</{name}> closes <{open_tag}>"
        else:
            return blocks, f"<{name}> inside <{open_tag}>"
    if open_tag is not None:
        return blocks, f"unclosed <{open_tag}>"
    if blocks and text[pos:].strip():  # with no blocks at all, "no <think> block" says more
        return blocks, "text outside the tags after the last block"
    return blocks, None


def _order_error(names):
    """Why a sequence of block names is not `think (tool | answer)`, or None."""
    if not names:
        return "no <think> block"
    if names[0] != "think":
        return f"the turn must start with <think>, not <{names[0]}>"
    rest = names[1:]
    if "think" in rest:
        return "more than one <think> block"
    n_tool, n_answer = rest.count("tool"), rest.count("answer")
    if n_tool and n_answer:
        return "both <tool> and <answer> in one turn"
    if not n_tool and not n_answer:
        return "neither <tool> nor <answer> after </think>"
    if n_tool > 1:
        return "more than one <tool> block"
    if n_answer > 1:
        return "more than one <answer> block"
    return None


def parse_turn(text: str) -> Turn:
    """Parse one assistant turn into a Turn. Never raises."""
    if not isinstance(text, str):
        return Turn(error=f"turn is not a string ({type(text).__name__})")
    blocks, error = _scan_blocks(text)
    if error is None:
        error = _order_error([name for name, _ in blocks])
    turn = Turn(answer=extract_answer(text), error=error)
    for name, body in blocks:
        if name == "think" and turn.think is None:
            turn.think = body.strip()
        elif name == "tool" and turn.tool is None:
            turn.tool, json_error = _parse_tool_json(body)
            if turn.error is None:
                turn.error = json_error
    return turn


# -----------------------------------------------------------------------------
# Tool-call validation (SPEC 3: 0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H, index in range)

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python


def _is_number(x):
    # Python ints are always finite (math.isfinite would overflow on a 400-digit one).
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))


MAX_IMAGES = 52  # visual inputs per trajectory, originals included (paper App. C)
MAX_ASPECT = 200  # the encoder's limit on an image's elongation (smart_resize); a crop has its box's shape


def validate_tool_call(call, image_sizes: list[tuple[int, int]], max_images: int = MAX_IMAGES,
                       n_images: int | None = None) -> str | None:
    """None if `call` is a valid zoom-in request, else the reason. The one judge of a call: the
    rollout's environment runs it before cutting crops and the reward (format_ok) after, so the
    reward never pays for a call the environment turned down. image_sizes[k] = (W, H) of image k
    as displayed to the model (originals first, then crops, SPEC 3); n_images: how many images
    exist when the call is made (default len(image_sizes)). A call may not take the trajectory
    past max_images visual inputs, nor name a box more elongated than MAX_ASPECT (its crop
    could not be encoded)."""
    if not isinstance(call, dict):
        return "tool call is not a JSON object"
    if "region" not in call:
        return "tool call has no 'region'"
    regions = call["region"]
    if not isinstance(regions, list):
        return "'region' is not a list"
    if not regions:
        return "'region' is empty: at least one region is required"
    for i, r in enumerate(regions):
        if not isinstance(r, dict):
            return f"region[{i}] is not an object"
        if "index" not in r:
            return f"region[{i}] has no 'index'"
        k = r["index"]
        if not _is_int(k):
            return f"region[{i}] 'index' is not an integer: {k!r}"
        if not 0 <= k < len(image_sizes):
            return f"region[{i}] 'index' {k} is out of range ({len(image_sizes)} images available)"
        if "bbox_2d" not in r:
            return f"region[{i}] has no 'bbox_2d'"
        box = r["bbox_2d"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            return f"region[{i}] 'bbox_2d' is not a list of 4 numbers: {box!r}"
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            return f"region[{i}] 'bbox_2d' {box} is inverted or degenerate (need x1 < x2 and y1 < y2)"
        w, h = image_sizes[k]
        if not (0 <= x1 and x2 <= w and 0 <= y1 and y2 <= h):
            return f"region[{i}] 'bbox_2d' {box} lies outside image {k} (width {w}, height {h})"
        if max(x2 - x1, y2 - y1) > MAX_ASPECT * min(x2 - x1, y2 - y1):
            return f"region[{i}] 'bbox_2d' {box} is too thin to encode (aspect ratio above {MAX_ASPECT})"
    if (len(image_sizes) if n_images is None else n_images) + len(regions) > max_images:
        return f"too many images: at most {max_images} visual inputs per conversation"
    if "query" not in call:
        return "tool call has no 'query'"
    query = call["query"]
    if not isinstance(query, str):
        return "'query' is not a string"
    if not query.strip():
        return "'query' is empty"
    return None


# -----------------------------------------------------------------------------
# Answers: option letters, numbers, yes/no

# A bare letter, any case, optionally in parentheses or followed by "." ":" ")":
# "B", "b", "B.", "(B)", "B)", "B:". Lowercase is safe here because the letter is all there is.
_LETTER_ONLY = re.compile(r"\(([A-Za-z])\)[.:]?|([A-Za-z])[.:)]?")
# A capital letter with a delimiter, then whitespace and option text: "B. text", "B) text",
# "(B) text", "B: text". The delimiter is required so that the "A" of "A cat" or "I think"
# is not read as an option; capitals only, so that prose like "a) ..." or "i. ..." is not either.
_LETTER_TEXT = re.compile(r"(?:\(([A-Z])\)[.:]?|([A-Z])[.:)])\s+\S")


def mc_letter(text: str) -> str | None:
    """The option letter (upper case) of an answer like "B", "(B)", "B. text", or None.
    Anything else (prose, "Answer: B", "Apple") is None: the prompt asks for the letter only."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    m = _LETTER_ONLY.fullmatch(text) or _LETTER_TEXT.match(text)
    if m is None:
        return None
    return (m.group(1) or m.group(2)).upper()


# Plain decimal: optional sign, digits with optional thousands commas, optional fraction,
# optional short exponent (|exp| < 1000 keeps Fraction cheap on adversarial input).
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _exact_number(x):
    """Exact value (Fraction) of a number or numeric answer text, or None. Strings are read
    as decimals ("0.1" is exactly 1/10) so MRA's threshold edges carry no float error."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return Fraction(x)
    if isinstance(x, float):
        return Fraction(repr(x)) if math.isfinite(x) else None  # repr: shortest decimal, 0.1 -> 1/10
    if not isinstance(x, str):
        return None
    words = x.split()
    if not words:
        return None
    word = words[0].rstrip(".")
    if len(word) > 64 or not _NUMBER.fullmatch(word):  # 64: no 4300-digit int conversions
        return None
    return Fraction(word.replace(",", ""))


def to_number(text) -> float | None:
    """The number an answer states, as a float, or None: the first word, trailing periods
    dropped, must be a plain decimal ("42", "-2", "3.14", "1,234", "42 meters" -> 42)."""
    value = _exact_number(text)
    if value is None:
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _relative_error(pred, gold):
    """|y_hat - y| / |y| as an exact Fraction; None if pred is not a number; math.inf for
    y = 0 and y_hat != 0 (then only y_hat = 0 scores, SPEC 5). A gold that is not a number
    is a data bug and raises."""
    y = _exact_number(gold)
    if y is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    y_hat = _exact_number(pred)
    if y_hat is None:
        return None
    if y == 0:
        return Fraction(0) if y_hat == 0 else math.inf
    return abs(y_hat - y) / abs(y)


def mra(pred, gold) -> float:
    """Mean Relative Accuracy as the paper defines it (Yang et al. 2024; used for R_correct):
    mean over theta in {0.50, 0.55, ..., 0.95} of 1[|y_hat - y| / |y| < 1 - theta].
    Thresholds are exact hundredths, so e.g. a relative error of exactly 0.5 fails theta 0.5.
    pred 12, gold 10 -> 0.6. A pred that is not a number scores 0."""
    err = _relative_error(pred, gold)
    if err is None:
        return 0.0
    thetas = [Fraction(t, 100) for t in range(50, 100, 5)]  # 10 values
    return sum(err < 1 - theta for theta in thetas) / len(thetas)


def _vsibench_thresholds(start=0.5, end=0.95, interval=0.05):
    """The confidence levels of VSI-Bench's scoring, as np.linspace computes them in float64.
    The reference asks for int((end - start) / interval + 2) points, meaning 11, but the
    float quotient is 10.999999999999998, so it gets 10 (step 0.05, not 0.045)."""
    num = int((end - start) / interval + 2)
    step = (end - start) / (num - 1)
    conf = [i * step + start for i in range(num)]  # numpy: arange(num) * step + start
    conf[-1] = end                                 # numpy sets the endpoint exactly
    return conf


_VSI_THRESHOLDS = _vsibench_thresholds()


def mra_vsibench(pred, gold) -> float:
    """Mean Relative Accuracy as VSI-Bench's public scoring code computes it (the
    thinking-in-space repo and lmms-eval; used by eval.py for benchmark scores, not for
    rewards): mean over its 10 float thresholds c of 1[|y_hat - y| / |y| <= 1 - c], all in
    float64, so edge cases land where the published numbers put them.
    pred 12, gold 10 -> 0.6; pred 11, gold 10 -> 0.9 (the paper's mra gives 0.8).
    Where we differ from that code, none of which touches its data (positive golds, answers
    that are numbers): numbers are read by to_number ("1,234" counts, "nan" does not), we
    divide by |y| (it divides by y, so a negative gold always scored 1), and y = 0 scores
    only y_hat = 0 (it raised ZeroDivisionError)."""
    y, y_hat = to_number(gold), to_number(pred)
    if y is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    if y_hat is None:
        return 0.0
    if y == 0:
        return 1.0 if y_hat == 0 else 0.0
    rel = abs(y_hat - y) / abs(y)
    return sum(rel <= 1 - c for c in _VSI_THRESHOLDS) / len(_VSI_THRESHOLDS)


def normalise_text(text):
    """Lowercase, drop punctuation, collapse whitespace: "Yes." -> "yes"."""
    return " ".join(re.sub(r"[^\w\s]", "", str(text).lower()).split())


# The problem types, defined once for the project: records (data.py), benchmarks (eval.py) and
# the reward all read `problem_type` through problem_kind. Spellings: lowercase, "_" and "-"
# read as spaces, then these aliases.
PROBLEM_TYPES = ("multiple choice", "numerical", "yes/no", "free-form")
_ALIASES = {
    "multiple choice": "multiple choice", "mc": "multiple choice",
    "numerical": "numerical", "numeric": "numerical",
    "regression": "numerical",  # scored exactly like numerical (paper: MRA)
    "yes/no": "yes/no", "yes no": "yes/no", "yesno": "yes/no",
    "free form": "free-form", "freeform": "free-form", "open": "free-form", "open ended": "free-form",
}


def problem_kind(problem_type) -> str:
    """One of PROBLEM_TYPES for a problem_type spelling ("mc", "Multiple-Choice", "regression",
    "yes_no", "free form", ...). ValueError naming the accepted spellings otherwise."""
    key = " ".join(str(problem_type).lower().replace("_", " ").replace("-", " ").split())
    if key not in _ALIASES:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[key]


def answer_correct(pred_text: str | None, gold, problem_type: str) -> float:
    """R_correct (paper sec. 3.4) of an extracted answer, by problem_kind(problem_type).
    MC: 1/0 letter match; numbers: mra (the paper's); yes/no and free-form: 1/0 normalised
    exact match (the paper's RL data has no free-form questions; this is eval's rule).
    pred_text None (no <answer>) scores 0. A gold that cannot be scored raises ValueError."""
    kind = problem_kind(problem_type)
    if kind == "multiple choice":
        gold_letter = mc_letter(str(gold))
        if gold_letter is None:
            raise ValueError(f"multiple-choice gold {gold!r} has no option letter")
        return float(mc_letter(pred_text) == gold_letter)
    if pred_text is None:
        return 0.0
    if kind == "numerical":
        return mra(pred_text, gold)
    return float(normalise_text(pred_text) == normalise_text(gold))


# -----------------------------------------------------------------------------
# The trajectory reward

def format_ok(turns: list[str], image_sizes: list[tuple[int, int]], n_images_at_turn: list[int] | None = None,
              max_images: int = MAX_IMAGES) -> tuple[bool, str | None]:
    """R_format (SPEC 5) of a trajectory's assistant turns, as (ok, first reason or None).

    Every turn must parse (balanced, ordered tags), every turn but the last must be a tool
    call, every tool call must validate, and the last turn must be a closed <answer>.
    image_sizes lists (W, H) of every image of the trajectory in index order (originals,
    then crops), and by default each call is validated against the full list. Pass
    n_images_at_turn[t] (how many images existed when turn t was written) to also reject a
    call that references a crop that did not exist yet. Calls are judged by validate_tool_call,
    as the rollout judges them (the max_images cap included).
    """
    if n_images_at_turn is not None and len(n_images_at_turn) != len(turns):
        raise ValueError(f"n_images_at_turn has {len(n_images_at_turn)} entries for {len(turns)} turns")
    if not turns:
        return False, "no assistant turns"
    last = len(turns) - 1
    parsed = [parse_turn(text) for text in turns]
    regions = [len(p.tool["region"]) if isinstance(p.tool, dict) and isinstance(p.tool.get("region"), list) else 0
               for p in parsed]
    for t, turn in enumerate(parsed):
        if turn.error is not None:
            return False, f"turn {t}: {turn.error}"
        if turn.tool is not None:
            if t == last:
                return False, f"turn {t}: the last turn is a tool call, not an <answer>"
            if n_images_at_turn is None:  # the crops of this call and the later ones end the list
                sizes, n = image_sizes, len(image_sizes) - sum(regions[t:])
            else:
                sizes = image_sizes[:n_images_at_turn[t]]
                n = len(sizes)
            reason = validate_tool_call(turn.tool, sizes, max_images, n)
            if reason is not None:
                return False, f"turn {t}: {reason}"
        elif t != last:
            return False, f"turn {t}: <answer> before the last turn"
    return True, None


def score(turns: list[str], gold, problem_type: str, image_sizes: list[tuple[int, int]],
          n_images_at_turn: list[int] | None = None, max_images: int = MAX_IMAGES) -> dict:
    """The reward of one trajectory (paper Eq. 5):
    {"correct": R_correct, "format": R_format, "reward": R, "reason": why format is 0}."""
    answer = extract_answer(turns[-1]) if turns else None
    correct = answer_correct(answer, gold, problem_type)
    ok, reason = format_ok(turns, image_sizes, n_images_at_turn, max_images)
    fmt = 1.0 if ok else 0.0
    # Eq. 5: the format bonus only counts when the answer earns something, so a tidy but
    # wrong trajectory gets 0. The release multiplied by 0.5; GRPO's group normalisation
    # (A = (R - mean) / std) cancels any constant scale, so we keep the paper's form.
    reward = (correct + fmt) if correct > 0 else 0.0
    return {"correct": correct, "format": fmt, "reward": reward, "reason": reason}
