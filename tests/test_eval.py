"""eval.py: benchmark loading and question rendering, scores from known predictions (hand
computed), end-to-end runs of a tiny random model on every benchmark with resume, sharding and
per-question failures, and the two figures (attention map, resolution sweep)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import pixels
import eval as E
import rollout
import zoom_world
from data import ChatTokenizer
import encoder
from encoder import VisionConfig, make_layout
from model import ViLaVT, tiny_config
from scripted import Scripted

from conftest import SHARED

BENCH = os.path.join(SHARED, "benchmarks")
FILES = {"HRBench4K.json": ("HRBench-4K", 800, 5), "ERQA.json": ("ERQA", 400, 10),
         "SpatialEval_spatialreal.json": ("SpatialEval-Real", 135, 10), "EmbSpatial.json": ("EmbSpatial", 3640, 10),
         "mmsi_bench.json": ("MMSI-Bench", 1000, 10)}
MC = "\nAnswer with the option's letter from the given choices directly."
NUM = "\nPlease answer the question using a single word or phrase (e.g., 42 or 3.14)."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to gain from a second thread, and on a busy 2-core
    machine the threads' spin-waits made this file 3-4x slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def benches():
    return {f: E.load_bench(os.path.join(BENCH, f)) for f in FILES}


# -----------------------------------------------------------------------------
# loading and rendering


def test_every_benchmark_loads(benches):
    assert sorted(os.listdir(BENCH)) == sorted(FILES)
    for f, (name, n, t_max) in FILES.items():
        qs = benches[f]
        assert len(qs) == n and not [q for q in qs if "error" in q], f
        assert E.bench_name(f) == name and E.default_tool_limit(name) == t_max
        assert {q["kind"] for q in qs} == {"multiple choice"} and all(q["gold_letter"] in "ABCD" for q in qs)


def by_id(qs, qid):
    return next(q for q in qs if q["qid"] == qid)


def test_question_texts_render_per_spec(benches):
    # options list appended one per line, then the release's MC suffix
    assert E.question_text(by_id(benches["HRBench4K.json"], 0)) == (
        "What is the number displayed above the entrance where the woman is standing?\n"
        "A. 27B\nB. 37B\nC. 27D\nD. 27E" + MC)
    assert E.question_text(by_id(benches["EmbSpatial.json"], "mp3d_0")) == (
        "Among the listed objects, which one is closest to your current location in the image?\n"
        "A. table\nB. towel\nC. door\nD. basket" + MC)
    # options inside the text (options null / absent) stay where they are
    assert E.question_text(by_id(benches["SpatialEval_spatialreal.json"], "spatialreal.vqa.sa_1543979.0")) == (
        "Please answer the following question based on the image. How many individual cartons of strawberries "
        "are there in the wooden basket? Available options:\nA. eight\nB. ten\nC. four\nD. six\n" + MC)
    assert E.question_text(by_id(benches["mmsi_bench.json"], 0)) == (
        "The images are taken continuously from a first-person perspective. In which direction are you moving?\n"
        "Options: A: Left while moving backward, B: Forward to the left, C: Forward to the right, "
        "D: Right while moving backward" + MC)


def test_erqa_interleaved_images_go_at_their_placeholders(benches):
    q = by_id(benches["ERQA.json"], 153)
    assert q["images"] == ["ERQA/153_0.jpg", "ERQA/153_1.jpg"]
    text = E.question_text(q)
    assert text.startswith("<image>Frame 1<image>Frame 2Is the camera position") and text.endswith(MC)
    imgs = [Image.new("RGB", (280, 140))] * 2
    render = lambda p: "".join("[IMG]" if x is data.IMAGE else x for x in data.prompt_parts(  # noqa: E731
        [(280, 140)] * 2, p.question, data.SYSTEM_PROMPT if p.system is None else p.system, p.user, p.instructions))
    chat = render(E.make_prompt(q, imgs, "chat", 10))
    user = chat.split("<|im_start|>user\n")[1]
    assert user.startswith(
        "These are 2 images with indexed from 0 to 1.\nAll images have size: width 280, height 140.\n"
        "Question: [IMG]The index of the provided image is 0.\nFrame 1[IMG]The index of the provided image is 1.\n"
        "Frame 2Is the camera position in frame 1 visible from frame 2? Choices:  A. yes.")
    assert user.count("[IMG]") == 2 and "<image>" not in chat and data.TOOL_FORMAT in user
    assert chat.startswith("<|im_start|>system\n" + data.SYSTEM_PROMPT)
    # direct: same layout, no tool described anywhere; plain: images at the placeholders, nothing else
    direct = render(E.make_prompt(q, imgs, "direct", 10))
    assert "Question: [IMG]The index of the provided image is 0.\nFrame 1[IMG]" in direct
    assert "<tool>" not in direct and "zoom-in tool one or more" not in direct and data.ANSWER_FORMAT in direct
    plain = render(E.make_prompt(q, imgs, "plain", 10))
    assert plain == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                     "[IMG]Frame 1[IMG]Frame 2Is the camera position in frame 1 visible from frame 2? "
                     "Choices:  A. yes. B. impossible to tell. C. no. D. totally. Please answer directly with only "
                     "the letter of the correct option and nothing else." + MC + "<|im_end|>\n<|im_start|>assistant\n")
    # no placeholders: all images first, then the text
    q0 = by_id(benches["mmsi_bench.json"], 0)
    p = render(E.make_prompt(q0, imgs, "plain", 10))
    assert "user\n[IMG][IMG]The images are taken continuously" in p


def test_record_formats_and_literals():
    rec = dict(question="How far?", answer="3.5", problem_type="regression", options="None", images="['a/1.jpg']")
    q = E.normalize(rec, 7)
    assert q["qid"] == 7 and q["images"] == ["a/1.jpg"] and q["options"] is None and q["kind"] == "numerical"
    assert E.question_text(q) == "How far?" + NUM
    q = E.normalize(dict(question="Which?", answer="B. dog", problem_type="multiple choice",
                         options="['A. cat', 'B. dog']", images=["x.png"], question_id="q1"), 0)
    assert q["qid"] == "q1" and q["gold_letter"] == "B" and E.question_text(q) == "Which?\nA. cat\nB. dog" + MC
    q = E.normalize(dict(question="Which?", answer="dog", problem_type="multiple choice", options=["cat", "dog"],
                         images=["x.png"]), 0)
    assert q["gold_letter"] == "B" and E.question_text(q) == "Which?\nA. cat\nB. dog" + MC
    # literals are parsed, never evaluated
    with pytest.raises(ValueError, match="options"):
        E.normalize(dict(question="Q", answer="A", problem_type="multiple choice", images=["x.png"],
                         options="__import__('os').system('echo pwned')"), 0)
    for bad, msg in [(dict(answer="A", problem_type="multiple choice", images=["x"]), "question"),
                     (dict(question="Q", answer="E?", problem_type="multiple choice", images=["x"]), "letter"),
                     (dict(question="Q", answer="ten", problem_type="numerical", images=["x"]), "not a number"),
                     (dict(question="<image><image>Q", answer="A", problem_type="mc", images=["x"]), "placeholders"),
                     # a JSONL record's own user turn is rendered at load, not at its rollout (issue 14, item 13)
                     (dict(question="Q", prompt="<image><image>Q", answer="A", problem_type="mc", images=["x"]),
                      "field 'prompt': user prompt has 2 <image> placeholders for 1 images"),
                     (dict(question="Q", answer="A", problem_type="essay", images=["x"]), "problem_type")]:
        with pytest.raises(ValueError, match=msg):
            E.normalize(bad, 0)


# -----------------------------------------------------------------------------
# scoring


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def mc(qid, gold, cat, options=None):
    return dict(question_id=qid, question=f"Q{qid}?", answer=gold, problem_type="multiple choice",
                options=options, images=[f"{qid}.png"], category=cat)


def num(qid, gold, cat, ptype="numerical"):
    return dict(question_id=qid, question=f"Q{qid}?", answer=gold, problem_type=ptype, options="None",
                images=f"['{qid}.png']", category=cat)


def result(qid, response, **kw):
    return json.dumps(dict(question_id=qid, response=response, mode="chat", **kw)) + "\n"


def test_scores_from_a_results_file(tmp_path):
    bench = write_json(tmp_path / "toy.json", [
        mc(1, "B", "color", ["A. red", "B. blue"]),
        mc(2, "C. dog", "color", "['A. cat', 'B. cow', 'C. dog']"),
        mc(3, "A", "count"),
        num(4, "10", "count"),
        num(5, "10", "size", "regression"),
        num(6, "10", "size"),
        mc(7, "A", "size"),
        mc(8, "A", "color"),  # never run: not counted, the summary says partial
    ])
    res = tmp_path / "toy.jsonl"
    with open(res, "w") as f:
        f.write(result(1, "<think> x </think>\n<answer> B </answer>"))  # 1
        f.write(result(2, "<think> x </think>\n<answer>(C)</answer>"))  # 1: "(C)" is letter C
        f.write(result(3, "<think> x </think>\n<answer> B. cow </answer>"))  # 0
        # VSI-Bench's MRA (10 float thresholds, <=): |11-10|/10 = 0.1 <= 1-c for c = 0.5 ... 0.9 (its float
        # 0.8999999999999999), 9 of 10 -> 0.9 (the paper's formula, strict <, would give 0.8)
        f.write(result(4, "<think> x </think>\n<answer> 11 </answer>"))
        f.write(result(5, "<think> x </think>\n<answer> 5 meters </answer>"))  # rel 0.5 <= 1-0.5 only: 0.1
        f.write(result(6, "<think> x </think> the answer is 10"))  # no <answer>: 0 (no fallback in chat mode)
        f.write(json.dumps(dict(question_id=7, response=None, error="image: not found", mode="chat")) + "\n")
        f.write('{"question_id": 8, "response": "<answ')  # a half-written last line: ignored
    s, = E.main(["--score", str(res), "--bench", bench])
    # overall: (1 + 1 + 0 + 0.9 + 0.1 + 0 + 0) / 7 = 3.0 / 7 = 42.857
    assert s["n"] == 7 and s["total"] == 8 and s["failed"] == 1
    assert s["score"] == pytest.approx(300 / 7)
    cats = s["breakdowns"]["category"]
    assert cats["color"] == (pytest.approx(100.0), 2)  # q1, q2
    assert cats["count"] == (pytest.approx(45.0), 2)  # (0 + 0.9) / 2
    assert cats["size"] == (pytest.approx(10 / 3), 3)  # (0.1 + 0 + 0) / 3
    md = open(tmp_path / "toy.md").read()
    assert "| Acc/MRA | 42.9 | 7/8 (partial) | 1 | - | - |" in md
    assert "| count | 2 | 45.0 |" in md


def test_plain_mode_reads_the_whole_reply():
    assert E.final_answer("B", "plain") == "B" and E.final_answer("B", "chat") is None
    assert E.final_answer("<think>t</think><answer> C </answer>", "plain") == "C"
    q = dict(kind="multiple choice", gold_letter="B", answer="B")
    assert E.score_answer(E.final_answer(" B.", "plain"), q) == (1.0, "B")


def test_a_malformed_benchmark_file_is_named(tmp_path):
    bad = tmp_path / "HRBench4K.json"
    bad.write_text('[{"question": "Q", ')
    with pytest.raises(SystemExit, match=f"{bad}: malformed JSON"):
        E.load_bench(str(bad))


def test_vsi_style_mean_of_type_means(tmp_path):
    def rec(qid, qtype, kind, gold):
        return dict(question_id=qid, question="Q", answer=gold, problem_type=kind, images=["v.png"],
                    question_type=qtype)
    bench = write_json(tmp_path / "vsibench_toy.json", [
        rec(0, "object_counting", "numerical", "4"),
        rec(1, "object_rel_direction_easy", "multiple choice", "A"),
        rec(2, "object_rel_direction_medium", "multiple choice", "A"),
        rec(3, "object_rel_direction_hard", "multiple choice", "A"),
    ])
    res = tmp_path / "vsi.jsonl"
    res.write_text("".join(result(i, f"<think>x</think><answer>{a}</answer>") for i, a in enumerate("4ABC")))
    s, = E.main(["--score", str(res), "--bench", bench])
    # object_counting: 1.0; object_rel_direction (difficulty stripped): (1 + 0 + 0) / 3;
    # overall = (100 + 33.33) / 2 = 66.67, not the plain mean 2/4 = 50
    assert s["name"] == "VSI-Bench"
    assert s["breakdowns"]["type (mean of means)"]["object_rel_direction"] == (pytest.approx(100 / 3), 3)
    assert s["score"] == pytest.approx((100 + 100 / 3) / 2)
    # the official VSI-Bench code averages the difficulty levels' means instead: with levels of
    # unequal size the two differ (easy: 2 of 2 right, medium: 0 of 1, hard: 0 of 1)
    write_json(tmp_path / "vsibench_toy.json", [
        rec(0, "object_counting", "numerical", "4"), rec(1, "object_rel_direction_easy", "multiple choice", "A"),
        rec(2, "object_rel_direction_easy", "multiple choice", "A"),
        rec(3, "object_rel_direction_medium", "multiple choice", "A"),
        rec(4, "object_rel_direction_hard", "multiple choice", "A")])
    res.write_text("".join(result(i, f"<think>x</think><answer>{a}</answer>") for i, a in enumerate("4AABC")))
    s, = E.main(["--score", str(res), "--bench", bench])
    assert s["score"] == pytest.approx((100 + 200 / 4) / 2)  # the authors' pooling: 2 of 4 right
    assert s["score_official"] == pytest.approx((100 + 100 / 3) / 2)  # (100 + 0 + 0) / 3 for the type
    md = open(tmp_path / "vsi.md").read()
    assert "| VSI-Bench, official pooling |" in md and "by type (mean of difficulty means, official)" in md


def test_hrbench_accuracy_and_rotation_spread(tmp_path):
    qs = E.load_bench(os.path.join(BENCH, "HRBench4K.json"))
    res = tmp_path / "hr.jsonl"
    # always "A": right exactly on rotation 0 (its gold is always A), wrong on rotations 1-3
    res.write_text("".join(result(q["qid"], "<think>x</think><answer>A</answer>") for q in qs))
    s, = E.main(["--score", str(res), "--bench", os.path.join(BENCH, "HRBench4K.json")])
    assert s["score"] == pytest.approx(25.0) and s["n"] == 800
    assert s["breakdowns"]["cycle_category"] == {"0": (100.0, 200), "1": (0.0, 200), "2": (0.0, 200), "3": (0.0, 200)}
    assert s["breakdowns"]["category"] == {"cross": (25.0, 400), "single": (25.0, 400)}
    assert s["spread"][:2] == (0.0, 100.0)
    md = open(tmp_path / "hr.md").read()
    assert "| HRBench-4K | Acc | 25.0 | 800/800 | 0 | 75.5 | 67.8 |" in md
    assert "max - min 100.0" in md


# -----------------------------------------------------------------------------
# end to end with a tiny random model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    m = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    m.init_weights()
    d = str(tmp_path_factory.mktemp("vilavt"))
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    tokenizer.save_pretrained(os.path.join(d, "query_tokenizer"))
    return d


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_images(root, questions, size=(160, 120)):
    for k, q in enumerate(questions):
        for j, p in enumerate(q["images"]):
            path = os.path.join(root, p)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            noise(*size, 10 * k + j).save(path)


@pytest.fixture
def short_system_prompt(monkeypatch):
    """The Figure 15 system prompt is ~1000 tokens under the tests' 400-token BPE; the runs that do
    not look at the prompt use a short one to stay fast on CPU (rollout reads data.SYSTEM_PROMPT)."""
    monkeypatch.setattr(data, "SYSTEM_PROMPT", "You are a helpful assistant. Zoom in with <tool> if needed.")


FAST = ["--max-new-tokens", "4", "--max-turn-tokens", "4", "--max-visual-tokens", "64", "--max-context", "4096",
        "--greedy", "--batch-size", "2"]


@pytest.fixture
def count_prompts(monkeypatch):
    seen = []
    real = rollout.rollout

    def spy(model, ct, prompts, *a, **kw):
        seen.extend(prompts)
        return real(model, ct, prompts, *a, **kw)

    monkeypatch.setattr(rollout, "rollout", spy)
    return seen


def lines_of(path):
    return [json.loads(x) for x in open(path)]


def test_every_benchmark_end_to_end(tmp_path, model_dir, benches, count_prompts, short_system_prompt):
    for f, (name, _, t_max) in FILES.items():
        root, out = str(tmp_path / "img"), str(tmp_path / f"{name}.jsonl")
        make_images(root, benches[f][:2])
        s = E.main(["--model", model_dir, "--bench", os.path.join(BENCH, f), "--image-root", root, "--limit", "2",
                    "--out", out] + FAST)
        lines = lines_of(out)
        assert [x["question_id"] for x in lines] == [q["qid"] for q in benches[f][:2]], f
        for x in lines:
            assert "error" not in x and isinstance(x["response"], str) and x["mode"] == "chat"
            assert x["max_tool_calls"] == t_max and x["n_new_tokens"] >= 1 and x["turns"][-1] == x["response"]
        assert s[("chat", 64)]["n"] == 2 and os.path.exists(str(tmp_path / f"{name}.md"))
    assert len(count_prompts) == 10
    # ERQA's question 0 has its image at a placeholder
    assert count_prompts[2].question.startswith("<image>If the yellow robot")
    # ERQA's interleaved two-frame question, run through the model: its images go in mid-question
    rec = next(r for r in json.load(open(os.path.join(BENCH, "ERQA.json"))) if r["question_id"] == 153)
    sub = write_json(tmp_path / "ERQA_subset.json", [rec])
    make_images(str(tmp_path / "img"), [E.normalize(rec, 0)])
    E.main(["--model", model_dir, "--bench", sub, "--image-root", str(tmp_path / "img"),
            "--out", str(tmp_path / "erqa153.jsonl")] + FAST)
    (line,) = lines_of(str(tmp_path / "erqa153.jsonl"))
    assert "error" not in line and len(line["image_sizes"]) == 2 and line["max_tool_calls"] == 10
    assert count_prompts[-1].question.startswith("<image>Frame 1<image>Frame 2Is the camera")


def test_resume_skips_done_questions(tmp_path, model_dir, benches, count_prompts, short_system_prompt):
    f, root, out = os.path.join(BENCH, "mmsi_bench.json"), str(tmp_path / "img"), str(tmp_path / "r.jsonl")
    make_images(root, benches["mmsi_bench.json"][:3])
    args = ["--model", model_dir, "--bench", f, "--image-root", root, "--out", out] + FAST
    E.main(args + ["--limit", "1"])
    assert len(count_prompts) == 1 and len(lines_of(out)) == 1
    E.main(args + ["--limit", "2"])  # only question 2 is new
    assert len(count_prompts) == 2 and [x["question_id"] for x in lines_of(out)] == [0, 1]
    with open(out, "a") as fh:  # a crash in the middle of writing a line
        fh.write('{"question_id": 2, "respo')
    E.main(args + ["--limit", "3"])
    assert len(count_prompts) == 3 and [x["question_id"] for x in lines_of(out)] == [0, 1, 2]
    E.main(args + ["--limit", "3"])  # all done: no model call at all
    assert len(count_prompts) == 3
    with pytest.raises(SystemExit, match="another --out"):  # one results file = one setting
        E.main(args + ["--limit", "3", "--mode", "direct"])


def test_failures_are_per_question_and_retried(tmp_path, model_dir, count_prompts, short_system_prompt):
    # our own JSONL records (the zoom world's schema), one good, one missing its image, one
    # unparseable, and a line that is not JSON
    recs = [dict(images=["a.png"], question="Is the digit 7?", options=["A. yes", "B. no"], answer="A",
                 problem_type="multiple choice", category="digits", target_boxes=[[0, 0, 10, 10]]),
            dict(images=["missing.png"], question="How many dots?", options=None, answer="3",
                 problem_type="numerical", category="dots", target_boxes=[]),
            dict(images=["a.png"], question="Which?", options="[unclosed", answer="A",
                 problem_type="multiple choice", category="digits")]
    path = tmp_path / "zoom" / "eval.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{not json\n")
    noise(160, 120, 0).save(tmp_path / "zoom" / "a.png")
    out = str(tmp_path / "z.jsonl")
    args = ["--model", model_dir, "--bench", str(path), "--out", out] + FAST  # images next to the file
    s = E.main(args)[("chat", 64)]
    lines = {x["question_id"]: x for x in lines_of(out)}
    assert len(count_prompts) == 1 and sorted(lines) == [0, 1, 2, 3]
    assert "error" not in lines[0] and lines[0]["max_tool_calls"] == 5  # not a known benchmark: T_max 5
    assert "image file not found" in lines[1]["error"] and "options" in lines[2]["error"]
    assert "malformed JSON" in lines[3]["error"]
    assert s["name"] == "zoom/eval" and s["n"] == 4 and s["failed"] == 3
    noise(160, 120, 1).save(tmp_path / "zoom" / "missing.png")
    s = E.main(args)[("chat", 64)]  # failed questions are retried; the fixed one now runs
    assert len(count_prompts) == 2 and s["failed"] == 2
    assert "error" not in E.read_results([out])[0]["1"]


def test_zoom_world_records_run_with_their_budget(tmp_path, model_dir, count_prompts, short_system_prompt):
    """zoom_world.make_world's eval.jsonl runs as it is: images next to the file, its records'
    own max_pixels and T_max."""
    zw = zoom_world.make_world(str(tmp_path / "zoom"), n_train=1, n_eval=3)
    recs = [json.loads(x) for x in open(zw["eval"])]
    out = str(tmp_path / "zw.jsonl")
    s = E.main(["--model", model_dir, "--bench", zw["eval"], "--out", out] + FAST)[("chat", 64)]
    lines = lines_of(out)
    assert [x["question_id"] for x in lines] == [r["id"] for r in recs] and s["name"] == "zoom/eval"
    for r, x, p in zip(recs, lines, count_prompts):
        assert "error" not in x and x["max_tool_calls"] == r["max_tool_calls"]
        assert p.max_pixels == r["max_pixels"] and all(w * h <= r["max_pixels"] for w, h in x["image_sizes"])
    assert s["n"] == 3 and s["total"] == 3


def test_torchrun_shards(tmp_path, model_dir, benches, monkeypatch, count_prompts, short_system_prompt):
    f, root, out = os.path.join(BENCH, "EmbSpatial.json"), str(tmp_path / "img"), str(tmp_path / "e.jsonl")
    make_images(root, benches["EmbSpatial.json"][:3])
    args = ["--model", model_dir, "--bench", f, "--image-root", root, "--out", out, "--limit", "3"] + FAST
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert E.main(args) == {}  # rank 1 is done, rank 0 is not: no summary yet
    monkeypatch.setenv("RANK", "0")
    s = E.main(args)  # the last rank to finish writes the summary
    ids = [q["qid"] for q in benches["EmbSpatial.json"][:3]]
    assert [x["question_id"] for x in lines_of(str(tmp_path / "e.rank0.jsonl"))] == [ids[0], ids[2]]
    assert [x["question_id"] for x in lines_of(str(tmp_path / "e.rank1.jsonl"))] == [ids[1]]
    assert s[("chat", 64)]["n"] == 3 and os.path.exists(str(tmp_path / "e.md"))
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process sees the ranks' results: nothing to redo
    E.main(args)
    assert len(count_prompts) == 3


def test_vanilla_model_plain_and_direct_modes(tmp_path, stock_dir, model_dir, benches, count_prompts,
                                              short_system_prompt):
    f, root = os.path.join(BENCH, "HRBench4K.json"), str(tmp_path / "img")
    make_images(root, benches["HRBench4K.json"][:1])
    common = ["--bench", f, "--image-root", root, "--limit", "1"] + FAST
    E.main(["--model", stock_dir, "--mode", "plain", "--out", str(tmp_path / "p.jsonl")] + common)
    E.main(["--model", model_dir, "--mode", "direct", "--out", str(tmp_path / "d.jsonl")] + common)
    (p,), (d,) = lines_of(str(tmp_path / "p.jsonl")), lines_of(str(tmp_path / "d.jsonl"))
    assert p["mode"] == "plain" and d["mode"] == "direct" and p["max_tool_calls"] == 0 == d["max_tool_calls"]
    assert count_prompts[0].user.startswith("<image>What is the number") and count_prompts[1].user is None
    assert count_prompts[1].instructions == data.DIRECT_INSTRUCTIONS


def test_ablations_are_run_recorded_and_kept_apart(tmp_path, model_dir, monkeypatch, short_system_prompt):
    """--blank-crops: a scripted zoom gives the plain run's trajectory (same tokens, crop sizes and
    grids) with a flat grey crop; the lines record the flag, the table names it, and a results file
    of the other setting is refused, either way. --initial-groups/--initial-inquiry (data.Initial):
    the rollout gets them, with the bare question as the originals' inquiry, and the same holds."""
    rec = dict(images=["a.png"], question="How many dots?", options=None, answer="3", problem_type="numerical")
    (tmp_path / "zoom").mkdir()
    bench = write_json(tmp_path / "zoom" / "dots.jsonl", rec)  # one JSON line
    noise(160, 120, 0).save(tmp_path / "zoom" / "a.png")  # displayed at 168x112 under 64 tokens
    trajs, real = [], rollout.rollout

    def scripted(model, ct, prompts, *a, **kw):  # the random model calls no tool: one zoom, then an answer
        call = '<think> look </think>\n<tool> {"region": [{"index": 0, "bbox_2d": [10, 10, 80, 60]}], ' \
               '"query": "the dots"} </tool>'
        script = ct.encode(call) + ct.encode("<think> done </think>\n<answer> 3 </answer>") + [ct.im_end]
        trajs.extend(real(Scripted(model, [script] * len(prompts)), ct, prompts, *a, **kw))
        return trajs[-len(prompts):]

    monkeypatch.setattr(rollout, "rollout", scripted)
    args = ["--model", model_dir, "--bench", bench] + FAST + ["--max-turn-tokens", "200", "--max-new-tokens", "400"]
    plain, blank = str(tmp_path / "plain.jsonl"), str(tmp_path / "blank.jsonl")
    E.main(args + ["--out", plain])
    s = E.main(args + ["--out", blank, "--blank-crops"])[("chat", 64)]
    (lp,), (lb,) = lines_of(plain), lines_of(blank)
    assert (lp["blank_crops"], lb["blank_crops"], lb["inquiry"]) == (False, True, True)
    assert lb["crops"] == lp["crops"] and lb["crops"][0]["query"] == "the dots" and lb["score"] == 1.0
    tp, tb = trajs
    assert tb.ids == tp.ids and tb.n_tool_calls == 1 and tb.n_invalid == 0
    assert torch.equal(tb.context.views[1].grid_thw, tp.context.views[1].grid_thw)
    crop = tb.context.views[1].pixel_values.view(-1, 3, 2 * 14 * 14)  # rows are (channel, temporal, 14, 14)
    assert (crop == crop[:1, :, :1]).all() and not torch.equal(tb.context.views[1].pixel_values,
                                                              tp.context.views[1].pixel_values)
    assert s["ablations"] == ["blank crops"] and "| zoom/dots [blank crops] |" in open(tmp_path / "blank.md").read()
    with pytest.raises(SystemExit, match="blank crops False, .*; this run is .* blank crops True, .*: pass another --out"):
        E.main(args + ["--out", plain, "--blank-crops"])
    with pytest.raises(SystemExit, match="inquiry True, blank crops True, .*; this run is .* inquiry False"):
        E.main(args + ["--out", blank, "--blank-crops", "--no-inquiry"])
    E.main(["--score", blank, "--bench", bench, "--out", str(tmp_path / "scored.md")])
    assert "| zoom/dots [blank crops] |" in open(tmp_path / "scored.md").read()
    joint = str(tmp_path / "joint.jsonl")
    s = E.main(args + ["--out", joint, "--initial-groups", "joint", "--initial-inquiry", "question"])[("chat", 64)]
    (lj,) = lines_of(joint)
    assert (lj["initial_groups"], lj["initial_inquiry"], lp["initial_groups"]) == ("joint", "question", "per-image")
    assert trajs[-1].context.queries == ["How many dots?", "the dots"] and trajs[0].context.queries == ["", "the dots"]
    assert s["ablations"] == ["originals joint", "question as inquiry"]
    with pytest.raises(SystemExit, match="initial groups per-image, initial inquiry none; this run is .* initial "
                                         "groups joint, initial inquiry none"):
        E.main(args + ["--out", plain, "--initial-groups", "joint"])


# -----------------------------------------------------------------------------
# figures


def test_explicit_attention_matches_the_encoder(tokenizer):
    """The attention map's hand-written softmax(qk^T/sqrt(d)) reproduces the layer's SDPA output
    (query-aware layer with inquiry keys), and the window-order -> raster mapping is right."""
    torch.manual_seed(0)
    m = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    m.init_weights()
    m.eval()
    ct = ChatTokenizer(tokenizer)
    pv, grid = pixels.preprocess_image(noise(200, 150, 3), max_pixels=200 * 150)
    qids, qmask = ct.queries(["the digit in the corner"])
    attn, got = m.visual.blocks[-1].attn, {}
    assert attn.query_aware
    attn.register_forward_hook(lambda mod, a, out: got.update(args=a, out=out))
    with torch.no_grad():
        m.encode_images(pv, grid[None], qids, qmask, torch.tensor([0]))
        x, lay, seg, text = got["args"]
        assert text.shape[0] == int(qmask.sum())  # the inquiry's keys are in play
        received, out = encoder.explicit_attention(attn, x, lay, seg, text, with_output=True, chunk_elems=500)
    assert torch.allclose(out, got["out"], atol=1e-5)
    N = x.shape[0]
    assert received.sum() < N and received.sum() > 0.5 * N  # some mass goes to the inquiry keys
    # the patch grid: rotary (row, col) of each token, carried through the same mapping
    g = torch.tensor([[1, 20, 36]])
    lay2 = make_layout(VisionConfig(depth=1, hidden_size=64, num_heads=4), g, None, None, "cpu")
    rc = E.patch_grid(lay2.pos, lay2, g[0])
    assert torch.equal(rc[..., 0], torch.arange(20)[:, None].expand(20, 36))
    assert torch.equal(rc[..., 1], torch.arange(36)[None].expand(20, 36))


def test_attention_map_png(tmp_path, model_dir):
    img_path, out = str(tmp_path / "photo.png"), str(tmp_path / "map.png")
    noise(300, 200, 4).save(img_path)
    E.main(["--attn-map", "--model", model_dir, "--image", img_path, "--query", "the red sign", "--out", out,
            "--max-visual-tokens", "64"])
    im = Image.open(out)
    assert im.mode == "RGB" and im.width > 2 * im.height > 0  # two panels side by side
    assert np.asarray(im).std() > 10


def test_resolution_sweep_table_and_plot(tmp_path, model_dir, benches, short_system_prompt):
    f, root = os.path.join(BENCH, "HRBench4K.json"), str(tmp_path / "img")
    make_images(root, benches["HRBench4K.json"][:1], size=(640, 480))
    out = str(tmp_path / "sw" / "hr.jsonl")
    s = E.main(["--model", model_dir, "--bench", f, "--image-root", root, "--limit", "1", "--out", out,
                "--sweep", "16,64", "--mode", "chat,direct"] + FAST + ["--batch-size", "1"])
    assert sorted(s) == [("chat", 16), ("chat", 64), ("direct", 16), ("direct", 64)]
    sizes = {t: lines_of(str(tmp_path / "sw" / f"hr.chat.tok{t}.jsonl"))[0]["image_sizes"][0] for t in (16, 64)}
    assert sizes[16][0] * sizes[16][1] < sizes[64][0] * sizes[64][1]  # the budget shrinks the image
    md = open(tmp_path / "sw" / "hr.sweep.md").read()
    assert "| Visual tokens | chat | direct | Qwen2.5-VL-7B (paper) | ViLaVT-SFT (paper) | ViLaVT (paper) |" in md
    assert [r.split(" | ")[0] for r in md.splitlines() if r.startswith("| ") and r[2].isdigit()] == ["| 16", "| 64"]
    im = Image.open(tmp_path / "sw" / "hr.sweep.png")
    assert im.size == (960, 600) and np.asarray(im).std() > 5


def test_sampled_answers_follow_the_question_not_the_batch(tmp_path, model_dir, benches, short_system_prompt):
    """Sampled decoding (T 1.0) draws each question's tokens from a generator seeded by its id:
    another batch size, or a resumed run that redoes some questions, gives the same responses
    (the seed once followed a batch's first question: after a resume 18 of 24 responses differed)."""
    f, root = os.path.join(BENCH, "mmsi_bench.json"), str(tmp_path / "img")
    make_images(root, benches["mmsi_bench.json"][:5])
    sampled = ["--max-new-tokens", "6", "--max-turn-tokens", "6", "--max-visual-tokens", "64", "--max-context", "4096",
               "--temperature", "1.0", "--top-p", "1.0", "--limit", "5"]
    runs = {}
    for name, batch in (("a", "5"), ("b", "2")):
        out = str(tmp_path / f"{name}.jsonl")
        E.main(["--model", model_dir, "--bench", f, "--image-root", root, "--out", out, "--batch-size", batch] + sampled)
        runs[name] = {x["question_id"]: x["response"] for x in lines_of(out)}
    assert runs["a"] == runs["b"] and len(set(runs["a"].values())) > 1
    out = str(tmp_path / "b.jsonl")  # a resume that redoes questions 1 and 3
    kept = [x for x in lines_of(out) if x["question_id"] not in (1, 3)]
    with open(out, "w") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in kept)
    E.main(["--model", model_dir, "--bench", f, "--image-root", root, "--out", out, "--batch-size", "2"] + sampled)
    assert {x["question_id"]: x["response"] for x in lines_of(out)} == runs["a"]
