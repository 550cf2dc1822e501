"""
reward.py: hand-computed tables (every expected value was worked out by hand from the
definitions; the VSI-Bench column from the reference code's float thresholds listed at
MRA_CASES) and hypothesis properties, including a cross-check of mra_vsibench against a
numpy transcription of VSI-Bench's scoring code.
"""

import json
import math
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reward  # noqa: E402

from reward import (  # noqa: E402
    MAX_ASPECT, Turn, answer_correct, extract_answer, format_ok, mc_letter, mra, mra_vsibench, parse_turn, problem_kind,
    score, to_number, validate_tool_call)

# -----------------------------------------------------------------------------
# MRA. Paper: rel < 1 - theta for 1 - theta in {.50,.45,.40,.35,.30,.25,.20,.15,.10,.05}, exact.
# VSI-Bench's code: rel <= 1 - c in float64, where the 10 values of 1 - c are
#   .5, .44999999999999996, .4, .35, .30000000000000004, .25, .19999999999999996,
#   .15000000000000002, .10000000000000009, .050000000000000044
# and rel is float64 too (e.g. (12.3 - 10) / 10 = 0.23000000000000007).

MRA_CASES = [
    # pred, gold, paper, vsibench
    (12, 10, 0.6, 0.6),               # rel .2: paper 6 of 10; VSI .19999999999999996 < .2, also 6
    (10, 10, 1.0, 1.0),
    ("10.0", "10", 1.0, 1.0),
    (15, 10, 0.0, 0.1),               # rel .5: strict < fails even theta .5; <= passes .5 only
    (5, 10, 0.0, 0.1),                # rel .5 from below
    (14, 10, 0.2, 0.3),               # rel .4: paper .50,.45; VSI also passes .4 (<=)
    (13, 10, 0.4, 0.5),               # rel .3 (float .29999999999999999) <= .30000000000000004
    (11, 10, 0.8, 0.9),               # rel .1: paper not .10/.05; VSI .1 <= .10000000000000009
    (9, 10, 0.8, 0.9),
    (10.5, 10, 0.9, 1.0),             # rel .05: paper fails .05 only; VSI .05 <= .050000000000000044
    ("10.4", 10, 1.0, 1.0),           # rel .04
    ("12.3", 10, 0.6, 0.6),           # rel .23 (float .23000000000000007)
    ("11.4", 10, 0.8, 0.8),           # rel .14 (float .14000000000000004)
    ("3.3", "3", 0.8, 0.9),           # rel exactly .1; in float .09999999999999994
    (0, 0, 1.0, 1.0),                 # y = 0: only y_hat = 0 scores
    ("0.0", 0, 1.0, 1.0),
    (0.1, 0, 0.0, 0.0),
    (-12, -10, 0.6, 0.6),             # relative to |y|
    (12, -10, 0.0, 0.0),              # rel 2.2
    ("abc", 10, 0.0, 0.0),            # not a number
    (None, 10, 0.0, 0.0),
    ("", 10, 0.0, 0.0),
    (True, 1, 0.0, 0.0),              # a bool is not a number
    ("42 meters", 42, 1.0, 1.0),      # first word is the number
    ("3.5m", 3.5, 0.0, 0.0),          # glued unit: not a plain number
    ("1,234", 1234, 1.0, 1.0),
    (7, 5, 0.2, 0.3),                 # rel .4
    (20, 10, 0.0, 0.0),               # rel 1.0
]


@pytest.mark.parametrize("pred,gold,paper,vsi", MRA_CASES)
def test_mra_table(pred, gold, paper, vsi):
    assert mra(pred, gold) == pytest.approx(paper, abs=1e-12)
    assert mra_vsibench(pred, gold) == pytest.approx(vsi, abs=1e-12)


def test_the_two_mras_differ_on_known_pairs():
    assert (mra(11, 10), mra_vsibench(11, 10)) == (0.8, 0.9)
    assert (mra(15, 10), mra_vsibench(15, 10)) == (0.0, 0.1)
    # SPEC 8 expected 0.6 vs 7/11 here, from an 11-point linspace the reference code never
    # builds (int(10.999999999999998) = 10 points); both give 0.6.
    assert mra(12, 10) == mra_vsibench(12, 10) == 0.6


def _vsibench_reference(pred, target):
    """Transcription of VSI-Bench's scoring (thinking-in-space lmms_eval/tasks/vsibench)."""
    num_pts = (0.95 - 0.5) / 0.05 + 2
    conf_intervs = np.linspace(0.5, 0.95, int(num_pts))
    return float((abs(pred - target) / target <= 1 - conf_intervs).mean())


def test_vsibench_thresholds_are_numpys():
    assert reward._VSI_THRESHOLDS == np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2)).tolist()
    assert len(reward._VSI_THRESHOLDS) == 10


@settings(max_examples=300, deadline=None)
@given(st.decimals(min_value=0, max_value=1000, places=2, allow_nan=False, allow_infinity=False),
       st.decimals(min_value="0.01", max_value=1000, places=2, allow_nan=False, allow_infinity=False),
       st.integers(1, 20), st.integers(1, 20))
def test_mra_vsibench_matches_reference_code(p, g, a, b):
    # Random decimals, plus small-integer ratios, which sit exactly on thresholds.
    for pred, gold in [(str(p), str(g)), (str(a), str(b)), (str(a * 10), "10"), (str(a), "20")]:
        assert mra_vsibench(pred, gold) == _vsibench_reference(float(pred), float(gold)), (pred, gold)


def test_mra_gold_not_a_number_raises():
    with pytest.raises(ValueError, match="not a number"):
        mra(3, "three")


@pytest.mark.parametrize("text,value", [
    ("42", 42.0), ("3.14", 3.14), ("-2", -2.0), ("+3", 3.0), ("1,234", 1234.0), ("1,234.5", 1234.5),
    (".5", 0.5), ("5.", 5.0), ("1e3", 1000.0), ("42 meters", 42.0), ("  7\n", 7.0), (3, 3.0), (2.5, 2.5),
    ("12,34", None), ("3,5", None), ("3.5m", None), ("about 4", None), ("three", None), ("1/2", None),
    ("", None), (".", None), ("-", None), ("inf", None), ("nan", None), ("1e999", None), (True, None),
    (None, None), (float("nan"), None),
])
def test_to_number(text, value):
    assert to_number(text) == value


# -----------------------------------------------------------------------------
# Option letters, yes/no, answer_correct

@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), ("B:", "B"), ("B. blue car", "B"),
    ("B) blue car", "B"), ("(B) blue car", "B"), ("B: blue car", "B"), (" b ", "B"), ("(c)", "C"),
    ("\nD.\n", "D"),
    ("Apple", None), ("A cat", None), ("I think B", None), ("Answer: B", None), ("B.text", None),
    ("b. text", None), ("a) text", None), ("(B", None), ("AB", None), ("", None), (None, None), ("12", None),
])
def test_mc_letter(text, letter):
    assert mc_letter(text) == letter


@pytest.mark.parametrize("pred,gold,ptype,value", [
    ("B", "B", "multiple choice", 1.0),
    ("B.", "B", "multiple choice", 1.0),
    ("(B)", "B. a red car", "multiple choice", 1.0),
    ("B. a red car", "B", "multiple choice", 1.0),
    (" b ", "B", "mc", 1.0),
    ("C", "B", "multiple choice", 0.0),
    ("Apple", "A", "multiple choice", 0.0),
    ("A cat", "A", "multiple_choice", 0.0),
    (None, "B", "multiple choice", 0.0),
    ("Yes", "yes", "yes/no", 1.0),
    ("yes.", "Yes", "yes/no", 1.0),
    (" NO ", "no", "yes_no", 1.0),
    ("No", "yes", "yes/no", 0.0),
    ("yes, it is", "yes", "yes/no", 0.0),
    (None, "yes", "yes/no", 0.0),
    ("12", 10, "numerical", 0.6),
    ("12", "10", "Numeric", 0.6),
    ("12", 10, "regression", 0.6),
    ("twelve", 10, "numerical", 0.0),
    (None, 10, "numerical", 0.0),
    ("B", "B", "Multiple-Choice", 1.0),
    ("A red car.", "a red car", "free-form", 1.0),  # normalised exact match, as eval scores it
    ("a blue car", "a red car", "free form", 0.0),
])
def test_answer_correct(pred, gold, ptype, value):
    assert answer_correct(pred, gold, ptype) == pytest.approx(value)


def test_answer_correct_unknown_type_names_it():
    with pytest.raises(ValueError, match="'essay'.*multiple choice"):
        answer_correct("x", "x", "essay")


def test_problem_types_are_one_definition():
    """data.py validates records and eval.py reads benchmarks with reward.problem_kind: a type
    one accepts, every other scores (the free-form record that once loaded and then crashed the
    reward mid-run)."""
    import data
    import eval as E
    rec = {"images": ["a.png"], "question": "Q", "answer": "a red car", "problem_type": "free-form"}
    assert data.check_record(rec, "x:1")["problem_type"] == "free-form"
    assert answer_correct("a red car", rec["answer"], rec["problem_type"]) == 1.0
    assert E.normalize(rec, 0)["kind"] == problem_kind("free-form") == "free-form"
    with pytest.raises(data.RecordError, match="x:1: field 'problem_type'"):
        data.check_record(dict(rec, problem_type="essay"), "x:1")


def test_answer_correct_mc_gold_without_letter_raises():
    with pytest.raises(ValueError, match="option letter"):
        answer_correct("B", "the red car", "multiple choice")


# -----------------------------------------------------------------------------
# Tool-call validation: one case per reason

SIZES = [(100, 80), (50, 40)]


def call(regions, query="find the sign"):
    return {"region": regions, "query": query}


def reg(index=0, box=(10, 10, 20, 20)):
    return {"index": index, "bbox_2d": list(box)}


INVALID_CALLS = [
    ("not object", [1], "not a JSON object"),
    ("no region", {"query": "q"}, "no 'region'"),
    ("region dict", {"region": {}, "query": "q"}, "'region' is not a list"),
    ("region empty", call([]), "'region' is empty"),
    ("item not object", call([3]), "region[0] is not an object"),
    ("no index", call([{"bbox_2d": [1, 1, 2, 2]}]), "region[0] has no 'index'"),
    ("index bool", call([reg(index=True)]), "'index' is not an integer"),
    ("index float", call([reg(index=1.0)]), "'index' is not an integer"),
    ("index str", call([reg(index="0")]), "'index' is not an integer"),
    ("index too big", call([reg(index=2)]), "'index' 2 is out of range"),
    ("index negative", call([reg(index=-1)]), "'index' -1 is out of range"),
    ("second region bad", call([reg(), reg(index=5)]), "region[1] 'index' 5 is out of range"),
    ("no bbox", call([{"index": 0}]), "region[0] has no 'bbox_2d'"),
    ("bbox 3", call([reg(box=(1, 2, 3))]), "not a list of 4 numbers"),
    ("bbox bool", call([reg(box=(1, 2, 3, True))]), "not a list of 4 numbers"),
    ("bbox str", call([reg(box=(1, 2, 3, "4"))]), "not a list of 4 numbers"),
    ("bbox nan", call([reg(box=(1, 2, 3, float("nan")))]), "not a list of 4 numbers"),
    ("bbox string", call([{"index": 0, "bbox_2d": "1,2,3,4"}]), "not a list of 4 numbers"),
    ("x inverted", call([reg(box=(30, 10, 20, 20))]), "inverted or degenerate"),
    ("x degenerate", call([reg(box=(10, 10, 10, 20))]), "inverted or degenerate"),
    ("y inverted", call([reg(box=(10, 30, 20, 20))]), "inverted or degenerate"),
    ("past right", call([reg(box=(0, 0, 101, 80))]), "outside image 0"),
    ("past bottom", call([reg(box=(0, 0, 100, 81))]), "outside image 0"),
    ("negative x", call([reg(box=(-1, 0, 10, 10))]), "outside image 0"),
    ("huge int", call([reg(box=(0, 0, 10**400, 10))]), "outside image 0"),
    ("outside crop", call([reg(index=1, box=(0, 0, 60, 40))]), "outside image 1 (width 50, height 40)"),
    ("no query", {"region": [reg()]}, "no 'query'"),
    ("query int", call([reg()], query=3), "'query' is not a string"),
    ("query blank", call([reg()], query=" \n "), "'query' is empty"),
]


@pytest.mark.parametrize("name,bad,expected", INVALID_CALLS, ids=[c[0] for c in INVALID_CALLS])
def test_validate_tool_call_reasons(name, bad, expected):
    reason = validate_tool_call(bad, SIZES)
    assert reason is not None and expected in reason


REASON_KINDS = ["not a JSON object", "no 'region'", "'region' is not a list", "'region' is empty",
                "is not an object", "has no 'index'", "'index' is not an integer", "is out of range",
                "has no 'bbox_2d'", "not a list of 4 numbers", "inverted or degenerate", "outside image",
                "no 'query'", "'query' is not a string", "'query' is empty"]


def test_validation_reasons_are_distinct_per_kind():
    seen = set()
    for _, bad, _ in INVALID_CALLS:
        reason = validate_tool_call(bad, SIZES)
        kinds = [k for k in REASON_KINDS if k in reason]
        assert len(kinds) == 1, (reason, kinds)  # each reason names exactly one kind of fault
        seen.add(kinds[0])
    assert seen == set(REASON_KINDS)


@pytest.mark.parametrize("good", [
    call([reg()]),
    call([reg(box=(0, 0, 100, 80))]),                        # edges are inclusive
    call([reg(index=1, box=(0, 0, 50, 40)), reg(index=0)]),  # several regions
    call([reg(box=(0.5, 1.5, 99.5, 79.0))]),                 # finite floats are numbers
    {"region": [reg()], "query": "q", "extra": 1},            # extra keys ignored
])
def test_validate_tool_call_accepts(good):
    assert validate_tool_call(good, SIZES) is None


# -----------------------------------------------------------------------------
# parse_turn / extract_answer

TOOL_JSON = json.dumps(call([reg()]))
TOOL_TURN = f"<think>zoom on the sign</think>\n<tool>{TOOL_JSON}</tool>"
ANSWER_TURN = "<think>it reads B</think>\n<answer> B </answer>"


def test_parse_valid_turns():
    t = parse_turn(TOOL_TURN)
    assert t == Turn(think="zoom on the sign", tool=call([reg()]), answer=None, error=None)
    t = parse_turn("\n  " + ANSWER_TURN + "\n\n")
    assert t == Turn(think="it reads B", tool=None, answer="B", error=None)
    t = parse_turn(f"<think></think><tool> \n{TOOL_JSON}\n </tool>")
    assert t.error is None and t.think == "" and t.tool == call([reg()])


@pytest.mark.parametrize("text,expected", [
    ("", "no <think> block"),
    ("   \n", "no <think> block"),
    ("<answer>A</answer>", "must start with <think>"),
    ("<think>x</think>", "neither <tool> nor <answer>"),
    (f"<think>x</think><tool>{TOOL_JSON}</tool><answer>A</answer>", "both <tool> and <answer>"),
    ("<think>x</think><answer>A", "unclosed <answer>"),
    ("<think>x", "unclosed <think>"),
    ("<think>x<answer>A</answer></think>", "<answer> inside <think>"),
    ("<think>x</answer>", "</answer> closes <think>"),
    ("</think><answer>A</answer>", "</think> without a matching <think>"),
    ("hello <think>x</think><answer>A</answer>", "text outside the tags"),
    ("<think>x</think> so <answer>A</answer>", "text outside the tags"),
    ("<think>x</think><answer>A</answer> bye", "text outside the tags"),
    ("<think>a</think><think>b</think><answer>A</answer>", "more than one <think>"),
    (f"<think>x</think><tool>{TOOL_JSON}</tool><tool>{TOOL_JSON}</tool>", "more than one <tool>"),
    ("<think>x</think><answer>A</answer><answer>B</answer>", "more than one <answer>"),
    ("<think>x</think><tool>{'region': []}</tool>", "not valid JSON"),
    ("<think>x</think><tool>[1, 2]</tool>", "not a JSON object"),
    ('<think>x</think><tool>{"region": [{"index": 0, "bbox_2d": [NaN, 0, 1, 1]}], "query": "q"}</tool>',
     "not valid JSON"),
    ("<think>x</think><tool>" + "[" * 100000 + "</tool>", "not valid JSON"),
    ("<THINK>x</THINK><ANSWER>A</ANSWER>", "no <think> block"),   # tags are lowercase
])
def test_parse_turn_errors(text, expected):
    t = parse_turn(text)
    assert t.error is not None and expected in t.error


def test_parse_turn_non_string():
    assert "not a string" in parse_turn(None).error
    assert "not a string" in parse_turn(b"<think></think>").error


def test_parse_turn_several_answers_keeps_the_last():
    t = parse_turn("<think>x</think><answer>A</answer>\n<answer> C </answer>")
    assert t.answer == "C" and "more than one <answer>" in t.error


@pytest.mark.parametrize("text,answer", [
    ("<answer> B </answer>", "B"),
    (ANSWER_TURN, "B"),
    ("<answer>A</answer> then <answer>\nC\n</answer>", "C"),
    ("<answer>a<answer>b</answer>", "b"),
    ("<answer></answer>", ""),
    ("B", None),                      # no fallback to the whole text
    ("<answer>B", None),              # not closed
    ("B</answer>", None),
    ("</answer><answer>B", None),
    (None, None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# -----------------------------------------------------------------------------
# format_ok / score (paper Eq. 5)

def tool_turn(index=0, box=(10, 10, 20, 20)):
    return f"<think>look</think><tool>{json.dumps(call([reg(index, box)]))}</tool>"


def answer_turn(ans):
    return f"<think>done</think><answer>{ans}</answer>"


@pytest.mark.parametrize("turns,gold,ptype,correct,fmt,reward", [
    ([tool_turn(), answer_turn("B")], "B", "multiple choice", 1.0, 1.0, 2.0),      # correct + format
    ([answer_turn("B")], "B", "multiple choice", 1.0, 1.0, 2.0),                   # no tool call needed
    (["<answer>B</answer>"], "B", "multiple choice", 1.0, 0.0, 1.0),               # correct, no format
    ([tool_turn(box=(0, 0, 500, 20)), answer_turn("B")], "B", "mc", 1.0, 0.0, 1.0),  # bad bbox
    ([answer_turn("C")], "B", "multiple choice", 0.0, 1.0, 0.0),                   # wrong: gated to 0
    ([tool_turn(), answer_turn("C")], "B", "multiple choice", 0.0, 1.0, 0.0),
    ([tool_turn(), answer_turn("12")], 10, "numerical", 0.6, 1.0, 1.6),            # MRA partial credit
    ([answer_turn("12 ")], "10", "regression", 0.6, 1.0, 1.6),
    (["12"], 10, "numerical", 0.0, 0.0, 0.0),                                      # no <answer>
    ([tool_turn()], "B", "multiple choice", 0.0, 0.0, 0.0),                        # ended on a tool call
    ([answer_turn("Yes")], "yes", "yes/no", 1.0, 1.0, 2.0),
    ([], "B", "multiple choice", 0.0, 0.0, 0.0),
])
def test_score_table(turns, gold, ptype, correct, fmt, reward):
    s = score(turns, gold, ptype, SIZES)
    assert s["correct"] == pytest.approx(correct)
    assert s["format"] == fmt
    assert s["reward"] == pytest.approx(reward)
    assert (s["reason"] is None) == (fmt == 1.0)


@pytest.mark.parametrize("turns,expected", [
    ([], "no assistant turns"),
    ([tool_turn()], "turn 0: the last turn is a tool call"),
    ([answer_turn("A"), answer_turn("B")], "turn 0: <answer> before the last turn"),
    ([tool_turn(), "<think>x</think>"], "turn 1: neither <tool> nor <answer>"),
    ([tool_turn(index=2), answer_turn("B")], "turn 0: region[0] 'index' 2 is out of range"),
    ([tool_turn(box=(20, 10, 10, 20)), answer_turn("B")], "turn 0: region[0] 'bbox_2d'"),
    ([tool_turn(), tool_turn(box=(0, 0, 101, 5)), answer_turn("B")], "turn 1: region[0] 'bbox_2d'"),
])
def test_format_ok_reasons(turns, expected):
    ok, reason = format_ok(turns, SIZES)
    assert not ok and reason.startswith(expected)


def test_format_ok_n_images_at_turn():
    # Turn 0 asks for image 1 (a crop), which only exists after turn 0's observation.
    turns = [tool_turn(index=1), tool_turn(index=1), answer_turn("B")]
    assert format_ok(turns, SIZES) == (True, None)  # default: the full list
    ok, reason = format_ok(turns, SIZES, n_images_at_turn=[1, 2, 2])
    assert not ok and reason.startswith("turn 0: region[0] 'index' 1 is out of range (1 images")
    assert format_ok(turns[1:], SIZES, n_images_at_turn=[2, 2]) == (True, None)
    with pytest.raises(ValueError):
        format_ok(turns, SIZES, n_images_at_turn=[1, 2])


# -----------------------------------------------------------------------------
# Properties

TAG_PIECES = ["<think>", "</think>", "<tool>", "</tool>", "<answer>", "</answer>", "<think", "</", ">", "<",
              "{", "}", "[", "]", '"region"', '"index"', '"bbox_2d"', '"query"', ":", ",", "0", "12", "-3", "1.5",
              '"q"', "NaN", "true", "null", " ", "\n", "x", "B", "\\", '"']


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_turn_never_raises_on_text(text):
    t = parse_turn(text)
    assert isinstance(t, Turn) and (t.error is None or isinstance(t.error, str))
    extract_answer(text)
    mc_letter(text)
    to_number(text)
    assert 0.0 <= mra(text, 7) <= 1.0 and 0.0 <= mra_vsibench(text, 7) <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TAG_PIECES), max_size=40).map("".join))
def test_parse_turn_never_raises_on_tag_soup(text):
    t = parse_turn(text)
    assert isinstance(t, Turn)
    if t.error is None:  # a well-formed turn is exactly one of the two kinds
        assert t.think is not None and ((t.tool is None) != (t.answer is None))
        if t.tool is not None:
            validate_tool_call(t.tool, SIZES)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["region", "index", "bbox_2d", "query", "x"]), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_validate_tool_call_never_raises(value):
    reason = validate_tool_call(value, SIZES)
    assert reason is None or isinstance(reason, str)


@st.composite
def valid_calls(draw):
    sizes = draw(st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), min_size=1, max_size=4))
    regions = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(0, len(sizes) - 1))
        w, h = sizes[k]
        bw = draw(st.integers(1, min(w, MAX_ASPECT * h)))  # boxes no more elongated than MAX_ASPECT
        bh = draw(st.integers(-(-bw // MAX_ASPECT), min(h, MAX_ASPECT * bw)))
        x1, y1 = draw(st.integers(0, w - bw)), draw(st.integers(0, h - bh))
        regions.append({"index": k, "bbox_2d": [x1, y1, x1 + bw, y1 + bh]})
    # A literal tag inside the query would be read as a tag (documented); keep them out.
    query = draw(st.text(min_size=1).filter(lambda q: q.strip() and not re.search(r"</?(think|tool|answer)>", q)))
    return {"region": regions, "query": query}, sizes


@settings(max_examples=200, deadline=None)
@given(valid_calls(), st.text(alphabet=" \n\tabc.", max_size=20), st.sampled_from(["", " ", "\n", "\n\n "]))
def test_valid_tool_call_round_trips(call_and_sizes, think, pad):
    c, sizes = call_and_sizes
    text = f"{pad}<think>{think}</think>{pad}<tool>{json.dumps(c)}</tool>{pad}"
    t = parse_turn(text)
    assert t.error is None
    assert t.tool == c and t.answer is None and t.think == think.strip()
    assert validate_tool_call(t.tool, sizes) is None
    assert format_ok([text, answer_turn("A")], sizes) == (True, None)


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value=-10**6, max_value=10**6, allow_nan=False, allow_infinity=False, places=3))
def test_mra_of_exact_answer_is_one(y):
    assert mra(str(y), str(y)) == 1.0 and mra_vsibench(str(y), str(y)) == 1.0
    assert math.isclose(to_number(str(y)), float(y))


def test_the_reward_judges_calls_as_the_environment_does():
    """One function (validate_tool_call) for the rollout and the reward: a call past the
    visual-input cap, or a box too thin to encode, is refused by both, so R_format is 0 where the
    environment turned the call down (both once paid format 1, reward 2)."""
    sizes = [(300, 300)] * 50  # 50 images exist when the call is made
    two = '<think> z </think>\n<tool> {"region": [{"index": 0, "bbox_2d": [0, 0, 10, 10]}, ' \
          '{"index": 1, "bbox_2d": [0, 0, 10, 10]}, {"index": 2, "bbox_2d": [0, 0, 10, 10]}], "query": "q"} </tool>'
    assert "too many images" in validate_tool_call(json.loads(two.split("<tool>")[1].split("</tool>")[0]), sizes)
    thin = {"region": [{"index": 0, "bbox_2d": [0, 0, 1, 201]}], "query": "q"}
    assert "too thin" in validate_tool_call(thin, [(300, 300)])
    assert validate_tool_call(dict(thin, region=[{"index": 0, "bbox_2d": [0, 0, 1, 200]}]), [(300, 300)]) is None
    answer = "<think> a </think>\n<answer> B </answer>"
    # the environment refused the 3 crops: the trajectory holds the 50 images and the call's text
    s = score([two, answer], "B", "multiple choice", sizes, n_images_at_turn=[50, 50])
    assert s["format"] == 0 and s["reward"] == 1.0 and "too many images" in s["reason"]
    s = score([two, answer], "B", "multiple choice", sizes + [(20, 20)] * 3)  # accepted: 53 images, cap 52
    assert s["format"] == 0 and "too many images" in s["reason"]
    assert score([two, answer], "B", "multiple choice", sizes + [(20, 20)] * 3, max_images=53)["format"] == 1
