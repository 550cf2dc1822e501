"""
Evaluation of ViLaVT (paper section 4, SPEC 8-9): benchmark runs and scores, the resolution
sweep (paper Table 3 / Figure 4) and vision-encoder attention maps (section 4.5.2, Figs 5/14).

    python eval.py --model out/grpo/latest --bench ../shared/benchmarks/HRBench4K.json --image-root data/bench
    torchrun --nproc_per_node 8 eval.py --model ... --bench ... --image-root ... --out out/eval/hrbench4k.jsonl
    python eval.py --score out/eval/hrbench4k.jsonl --bench ../shared/benchmarks/HRBench4K.json
    python eval.py --model ... --bench .../HRBench4K.json --image-root ... --sweep 1024,2048,4096,8192
    python eval.py --attn-map --model ... --image photo.jpg --query "the text on the blue sign" --out map.png

Benchmarks: the authors' JSON lists (../shared/benchmarks/) or our own JSONL records (e.g. the
zoom world's `--bench out/zoom/eval.jsonl`); the format is told by the extension.
Image paths are relative to --image-root (default: the benchmark file's folder).

Modes (--mode), i.e. the paradigms of the paper's Tables 1-2, from one script:
  chat    "chatting with images": the Figure 15/16 prompts, up to T_max tool calls (5 for
          HRBench, 10 for the spatial sets, or --max-tool-calls), crops re-encoded with the
          inquiry. The answer is the last <answer> of the final turn (no fallback, SPEC 5).
  direct  "thinking about images": one turn, no tools (T_max = 0). Same user layout (image
          indices, sizes, question) but Qwen's plain system prompt and an instruction to think
          and then answer in <think>/<answer> tags, so nothing invites a tool call; a tool call
          anyway ends the trajectory unanswered. The paper's Table 2 has no such "w/o chatting"
          row (its rows are checkpoints, all evaluated in chat mode except the Qwen2.5-VL ones,
          which are non-thinking): this mode is the Table 1 "thinking about images" setting and
          separates what multi-turn re-encoding adds from what textual reasoning adds.
  plain   "non-thinking": Qwen's default system prompt, the images (at their placeholders, or
          first) and the question with the release's type suffix, nothing else; the answer is
          the whole reply (or its <answer> if it wrote one). The Qwen2.5-VL-7B rows.
A stock Qwen2.5-VL folder loads as the vanilla model (no inquiry path) in any mode: that is the
Table 2 "Qwen2.5-VL-7B" row in plain mode and "w/ vanilla ViT" checkpoints in chat mode.
Ablations of chat mode, alone or together: --no-inquiry (the paper's "w/o inquiry": crops
re-encoded without the query) and --blank-crops (each crop a flat grey image of the real crop's
size: where the model zoomed and as many tokens, not what is there). Lines record both; the
tables name them.

Scores (SPEC 8): multiple choice = the option letter of the answer (reward.mc_letter: "B",
"(B)", "B. text") against the gold letter; numerical/regression = the benchmark's own MRA
(reward.mra_vsibench, VSI-Bench's public code; NOT the paper's reward formula); yes/no and
free-form = normalised exact match. A failed question (missing image, bad record, OOM) scores
0 and is counted. Overall: HRBench plain accuracy over its 800 items (plus the spread over
its 4 option rotations, `cycle_category`); VSI-Bench / SPAR-Bench the unweighted mean of
per-question-type means (VSI without _easy/_medium/_hard); everything else a plain mean.
Breakdowns for every category-like field a benchmark has (category, cycle_category, task,
original_question_type, question_type). The Markdown table puts the paper's Table 1 beside ours.

Results: one JSON line per question, appended, flushed and fsynced as soon as it is done, so a
crash loses nothing; a re-run skips every question with a successful line (a half-written last
line is dropped; failed questions are retried). Under torchrun rank r takes questions i with
i % world == r and appends to its own `<out>.rank{r}.jsonl`; every reader takes the union of
`<out>` and its rank files, so resuming with another world size works. Whichever rank finds
all questions done writes the Markdown summary `<out stem>.md`. Each line holds question_id
and response (the raw final assistant turn) plus answer, score, all turns, crops, finish, ...;
`--score` recomputes every number from question_id + response (+ mode) alone.
"""

import argparse
import ast
import dataclasses
import glob
import json
import os
import re
import statistics
import sys
import time
import zlib

import torch

import data
import encoder
import plots
import rollout
from pixels import MIN_PIXELS, TOTAL_VISUAL_TOKENS, budget_per_crop, load_image, preprocess_image
from model import atomic_write
from reward import extract_answer, mc_letter, mra_vsibench, normalise_text, parse_turn, problem_kind, to_number

# -----------------------------------------------------------------------------
# benchmarks: names, paper numbers, tool limits, aggregation

# Paper Table 1 (SPEC 9): ViLaVT-7B and the non-thinking Qwen2.5-VL-7B.
PAPER = {
    "HRBench-4K": (75.5, 67.8), "HRBench-8K": (69.3, 65.1), "SpatialEval-Real": (68.9, 58.5),
    "EmbSpatial": (69.3, 52.7), "ERQA": (42.2, 39.3), "SPAR-Bench": (52.6, 36.9),
    "MMSI-Bench": (31.3, 26.9), "VSI-Bench": (52.0, 34.7),
}
# Paper Table 3: HRBench-4K accuracy at total visual-token budgets (the sweep's reference lines).
PAPER_TABLE3 = {
    "Qwen2.5-VL-7B (paper)": {1024: 56.4, 2048: 61.4, 4096: 66.8, 8192: 67.8},
    "ViLaVT-SFT (paper)": {1024: 62.5, 2048: 69.8, 4096: 69.9, 8192: 73.6},
    "ViLaVT (paper)": {1024: 63.9, 2048: 70.1, 4096: 73.0, 8192: 75.5},
}
# file-name key (lower case, letters and digits only) -> canonical name; first match wins
NAMES = [("hrbench8k", "HRBench-8K"), ("hrbench4k", "HRBench-4K"), ("spatialeval", "SpatialEval-Real"),
         ("embspatial", "EmbSpatial"), ("erqa", "ERQA"), ("spar", "SPAR-Bench"), ("mmsi", "MMSI-Bench"),
         ("vsi", "VSI-Bench")]
HIGH_RES = {"HRBench-4K", "HRBench-8K"}  # T_max 5 (paper App. C); the spatial sets get 10
SPATIAL = {"SpatialEval-Real", "EmbSpatial", "ERQA", "SPAR-Bench", "MMSI-Bench", "VSI-Bench"}
# SPEC 8: VSI-Bench and SPAR-Bench report the unweighted mean of per-question-type means
# (VSI strips the difficulty suffix first); everything else is a plain mean over questions.
TYPE_MEAN = {"VSI-Bench": (("question_type", "original_question_type"), r"_(easy|medium|hard)$"),
             "SPAR-Bench": (("question_type", "original_question_type", "task", "category"), None)}
# per-category breakdowns: every one of these fields that a benchmark has (HRBench category +
# cycle_category, ERQA category, EmbSpatial task, MMSI original_question_type, VSI question_type)
CATEGORY_FIELDS = ("category", "cycle_category", "task", "original_question_type", "question_type")

# The release appends these to the question (SPEC 8), after the options.
SUFFIX = {"multiple choice": "\nAnswer with the option's letter from the given choices directly.",
          "numerical": "\nPlease answer the question using a single word or phrase (e.g., 42 or 3.14)."}

MODES = ("chat", "direct", "plain")
# the ablations a results line records: (its key, the value of a plain run, the label the tables show)
ABLATIONS = (("inquiry", True, "w/o inquiry"), ("blank_crops", False, "blank crops"),
             ("initial_groups", "per-image", "originals joint"), ("initial_inquiry", "none", "question as inquiry"))


def bench_name(path):
    key = re.sub(r"[^a-z0-9]", "", os.path.splitext(os.path.basename(path))[0].lower())
    for k, name in NAMES:
        if k in key:
            return name
    # our own files (out/zoom/eval.jsonl): parent folder + stem says more than "eval"
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{parent}/{stem}" if parent else stem


def default_tool_limit(name):
    return 5 if name in HIGH_RES else 10 if name in SPATIAL else None


# -----------------------------------------------------------------------------
# benchmarks: loading


def parse_list(value, field):
    """A list of strings from a list, the string 'None', or a Python-literal list string.
    ast.literal_eval only: benchmark files are data, never code."""
    if value is None:
        return None
    if isinstance(value, str):
        s = value.strip()
        if s in ("", "None", "null", "[]"):
            return None
        if field == "images" and not s.startswith(("[", "(")):
            return [s]  # a single bare path
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise ValueError(f"field '{field}': not a list literal ({type(e).__name__}: {str(e)[:60]})") from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"field '{field}': expected a list of strings, got {str(value)[:80]!r}")
    return value or None


def normalize(rec, index, max_frames=32):
    """One benchmark record -> a question dict (qid, images, question, options, kind, answer,
    gold_letter, meta, max_tool_calls). ValueError (the reason) for an unusable record."""
    if not isinstance(rec, dict):
        raise ValueError(f"record is a {type(rec).__name__}, not an object")
    if "video" in rec and "images" not in rec:  # our JSONL schema: frames, sampled like in training
        images = data.image_paths({"video": parse_list(rec["video"], "video") or []}, max_frames)
    else:
        images = parse_list(rec.get("images"), "images")
    if not images:
        raise ValueError("field 'images': no images")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("field 'question': missing or not a string")
    n_ph = question.count("<image>")
    if n_ph and n_ph != len(images):
        raise ValueError(f"question has {n_ph} <image> placeholders for {len(images)} images")
    options = parse_list(rec.get("options"), "options")
    bad_prompt = data.prompt_error(rec, len(images), question=question)  # our records' own user turn, at load
    if bad_prompt:
        raise ValueError("field '{}': {}".format(*bad_prompt))
    if "problem_type" not in rec:
        raise ValueError("field 'problem_type': missing")
    kind = problem_kind(rec["problem_type"])  # one of reward.PROBLEM_TYPES
    answer = rec.get("answer")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
        raise ValueError("field 'answer': missing")
    gold_letter = None
    if kind == "multiple choice":
        gold_letter = mc_letter(str(answer))
        if gold_letter is None and options:  # an answer given as the option's text
            texts = [re.sub(r"^\(?[A-Z][.):]\s*", "", o.strip()) for o in options]
            if str(answer).strip() in texts:
                gold_letter = chr(65 + texts.index(str(answer).strip()))
        if gold_letter is None:
            raise ValueError(f"field 'answer': multiple-choice answer {answer!r} has no option letter")
    elif kind == "numerical" and to_number(str(answer)) is None:
        raise ValueError(f"field 'answer': numerical answer {answer!r} is not a number")
    mt = rec.get("max_tool_calls")
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 0):
        raise ValueError(f"field 'max_tool_calls': {mt!r} is not a non-negative int")
    mp = rec.get("max_pixels")
    if data.max_pixels_error(mp):
        raise ValueError(f"field 'max_pixels': {data.max_pixels_error(mp)}")
    return dict(qid=question_id(rec, index), images=images, question=question, options=options, kind=kind,
                answer=answer, gold_letter=gold_letter, meta=rec, max_tool_calls=mt, max_pixels=mp)


def question_id(rec, index):
    if isinstance(rec, dict):
        for k in ("question_id", "id"):
            if isinstance(rec.get(k), (str, int)) and not isinstance(rec.get(k), bool):
                return rec[k]
    return index


def load_bench(path, max_frames=32):
    """[question dict or {'qid', 'error', 'meta'}] in file order. A record that cannot be used
    becomes an entry with its reason (reported per question, never a crash of the run)."""
    if path.endswith((".jsonl", ".jl")):
        recs = []
        with open(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    recs.append(ValueError(f"{path}:{i + 1}: malformed JSON ({e})"))
    else:
        with open(path) as f:
            try:
                recs = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: malformed JSON ({e})") from None
        if isinstance(recs, dict):  # {"data": [...]} or {"questions": [...]}
            recs = next((v for v in recs.values() if isinstance(v, list)), None)
        if not isinstance(recs, list):
            raise SystemExit(f"{path}: expected a JSON list of questions")
    out, seen = [], set()
    for i, rec in enumerate(recs):
        qid = question_id(rec, i)
        try:
            if isinstance(rec, Exception):
                raise rec
            q = normalize(rec, i, max_frames)
            # our own JSONL records (the zoom world) are trained without the release's type
            # suffix, so they are asked without it: train and eval prompts stay identical
            q["suffix"] = not path.endswith((".jsonl", ".jl"))
        except ValueError as e:
            q = dict(qid=qid, error=f"bad record: {e}", meta=rec if isinstance(rec, dict) else {})
        if str(qid) in seen:
            raise SystemExit(f"{path}: duplicate question_id {qid!r} (record {i})")
        seen.add(str(qid))
        out.append(q)
    return out


def question_text(q):
    """The question as the model reads it: options appended one per line (SPEC 8), then the
    release's type suffix. Options already inside the text (ERQA "Choices:", SpatialEval
    "Available options:", MMSI "Options: A: ...") stay where they are."""
    return data.format_question(q["question"], q["options"]) + (SUFFIX.get(q["kind"], "") if q.get("suffix", True) else "")


def make_prompt(q, images, mode, t_max, max_pixels=None, initial=data.Initial()):
    """chat / direct: the record's prompt in that mode, read as SFT and GRPO read it (data.record_prompt;
    our JSONL records may carry their own system prompt and user turn). plain: eval's own. `initial`:
    the originals' encoder groups and inquiry (the bare question, as SFT puts it there)."""
    text = question_text(q)
    if mode == "plain":
        user = text if "<image>" in text else "<image>" * len(images) + text
        return rollout.Prompt(images, text, max_tool_calls=0, max_pixels=max_pixels, system=data.PLAIN_SYSTEM,
                              user=user, initial=initial, inquiry=q["question"])
    return rollout.Prompt(images, max_tool_calls=t_max if mode == "chat" else 0, max_pixels=max_pixels,
                          initial=initial, inquiry=q["question"], **data.record_prompt(q["meta"], mode, question=text))


# -----------------------------------------------------------------------------
# scoring (SPEC 8: the benchmarks' own metrics)


def final_answer(response, mode):
    """The answer text of a final turn: its last <answer> (chat, direct); plain mode has no
    tags to ask for, so its whole reply is the answer unless it wrote an <answer>."""
    if not isinstance(response, str):
        return None
    a = extract_answer(response)
    if a is None and mode == "plain":
        a = response.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()
    return a


def score_answer(answer, q):
    """(score in [0, 1], prediction): option letter match for MC, the benchmark's MRA
    (reward.mra_vsibench, VSI-Bench's own code) for numerical/regression, normalised exact
    match for yes/no and free-form. No answer scores 0."""
    if q["kind"] == "multiple choice":
        pred = mc_letter(answer) if answer is not None else None
        return float(pred == q["gold_letter"]), pred
    if answer is None:
        return 0.0, None
    if q["kind"] == "numerical":
        return mra_vsibench(answer, str(q["answer"])), to_number(answer)
    return float(normalise_text(answer) == normalise_text(q["answer"])), answer


def results_files(out):
    """<out> and its per-rank siblings <stem>.rank{r}<ext>."""
    stem, ext = os.path.splitext(out)
    return [p for p in [out] + sorted(glob.glob(glob.escape(stem) + ".rank*" + ext)) if os.path.exists(p)]


def read_results(paths):
    """{str(question_id): line}: a successful line wins over failed ones, otherwise the last
    line read. Unparseable lines (a half-written tail) are skipped and counted."""
    best, bad = {}, 0
    for p in paths:
        with open(p, "rb") as f:
            for raw in f:
                try:
                    line = json.loads(raw)
                    key = str(line["question_id"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                old = best.get(key)
                if old is None or old.get("error") is not None:  # the first success stays
                    best[key] = line
    return best, bad


def ablations(line):
    """Labels of the ablations a results line was made under ([] for a plain run; older lines lack the keys)."""
    return [label for key, plain, label in ABLATIONS if line.get(key, plain) != plain]


def summarize(name, questions, lines):
    """Scores of one benchmark from its questions and results lines (question_id -> line).
    Only questions with a line count (a partial run is marked); failed ones score 0."""
    rows, notes = [], set()  # (question, score, failed); the ablations the lines were made under
    for q in questions:
        line = lines.get(str(q["qid"]))
        if line is None:
            continue
        notes.update(ablations(line))
        if "error" in q:
            rows.append((q, 0.0, True))
            continue
        if line.get("error") is not None:
            rows.append((q, 0.0, True))
            continue
        s, _ = score_answer(final_answer(line.get("response"), line.get("mode", "chat")), q)
        rows.append((q, s, False))
    n = len(rows)
    res = dict(name=name, n=n, total=len(questions), failed=sum(f for _, _, f in rows), ablations=sorted(notes),
               kinds=sorted({q.get("kind") for q, _, _ in rows if q.get("kind")}), breakdowns={}, spread=None)
    if not n:
        res["score"] = None
        return res
    meta = lambda q, f: q.get("meta", {}).get(f)  # noqa: E731
    for f in CATEGORY_FIELDS:
        vals = {meta(q, f) for q, _, _ in rows}
        if len(vals - {None}) >= 2:
            groups = {}
            for q, s, _ in rows:
                groups.setdefault(str(meta(q, f)), []).append(s)
            res["breakdowns"][f] = {k: (100 * statistics.fmean(v), len(v)) for k, v in sorted(groups.items())}
    if name in TYPE_MEAN:
        fields, strip = TYPE_MEAN[name]
        field = next((f for f in fields if any(meta(q, f) is not None for q, _, _ in rows)), None)
        if field is not None:
            groups = {}
            for q, s, _ in rows:
                t = str(meta(q, field))
                groups.setdefault(re.sub(strip, "", t) if strip else t, []).append(s)
            res["breakdowns"]["type (mean of means)"] = {k: (100 * statistics.fmean(v), len(v))
                                                          for k, v in sorted(groups.items())}
            res["score"] = statistics.fmean(m for m, _ in res["breakdowns"]["type (mean of means)"].values())
            if strip:  # VSI-Bench's official code instead averages a type's difficulty levels' means
                levels = {}
                for q, s, _ in rows:
                    t = str(meta(q, field))
                    levels.setdefault(re.sub(strip, "", t), {}).setdefault(t, []).append(s)
                official = {k: (100 * statistics.fmean(statistics.fmean(v) for v in d.values()),
                                sum(len(v) for v in d.values())) for k, d in sorted(levels.items())}
                res["breakdowns"]["type (mean of difficulty means, official)"] = official
                res["score_official"] = statistics.fmean(m for m, _ in official.values())
            return res
    res["score"] = 100 * statistics.fmean(s for _, s, _ in rows)
    rot = res["breakdowns"].get("cycle_category")
    if rot and len(rot) > 1:  # HRBench: 4 option rotations of the same 200 questions
        accs = [m for m, _ in rot.values()]
        res["spread"] = (min(accs), max(accs), statistics.pstdev(accs))
    return res


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def _label(name, notes, file_label=None):
    """A table's name for a results file: an ablation run must not pass for the model's own score."""
    name += f" [{', '.join(notes)}]" if notes else ""
    return name if file_label is None else f"{name} ({file_label})"


def markdown(summaries, title="Results", labels=None):
    """The results table (ours beside the paper's Table 1) and per-category tables."""
    out = [f"## {title}", "",
           "| Benchmark | Metric | Ours | Questions | Failed | ViLaVT-7B (paper) | Qwen2.5-VL-7B (paper) |",
           "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(summaries):
        metric = "/".join(sorted({"numerical": "MRA"}.get(k, "Acc") for k in s["kinds"])) or "-"
        if s["name"] in TYPE_MEAN and "type (mean of means)" in s["breakdowns"]:
            metric += " (mean of types)"
        paper = PAPER.get(s["name"], (None, None))
        n = f"{s['n']}/{s['total']}" + ("" if s["n"] == s["total"] else " (partial)")
        label = _label(s["name"], s["ablations"], labels and labels[i])
        out.append(f"| {label} | {metric} | {_fmt(s['score'])} | {n} | {s['failed']} | {_fmt(paper[0])} | "
                   f"{_fmt(paper[1])} |")
        if s.get("score_official") is not None:  # VSI-Bench: the benchmark's own pooling, beside the authors'
            out.append(f"| {label}, official pooling | {metric}, difficulty levels averaged | "
                       f"{_fmt(s['score_official'])} | {n} | {s['failed']} | - | - |")
    for i, s in enumerate(summaries):
        label = _label(s["name"], s["ablations"], labels and labels[i])
        for field, groups in s["breakdowns"].items():
            out += ["", f"### {label}: by {field}", "", f"| {field} | Questions | Score |", "|---|---|---|"]
            out += [f"| {k} | {n} | {m:.1f} |" for k, (m, n) in groups.items()]
            if field == "cycle_category" and s["spread"]:
                lo, hi, sd = s["spread"]
                out += ["", f"Option-rotation spread: min {lo:.1f}, max {hi:.1f}, max - min {hi - lo:.1f}, "
                            f"std {sd:.2f} (points)."]
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# running a benchmark


class ResultsWriter:
    """Appends one JSON line per question; flush + fsync per line, so a crash loses at most the
    line being written, and that half line is cut off when the file is opened again."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb+") as f:
                content = f.read()
                if content and not content.endswith(b"\n"):
                    f.truncate(content.rfind(b"\n") + 1)
        self.f = open(path, "a")

    def write(self, obj):
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def trajectory_line(q, traj, mode, t_max):
    """Everything worth keeping of one trajectory (question_id + response is what --score needs)."""
    response = traj.turns[-1] if traj.turns else ""
    answer = final_answer(response, mode)
    s, pred = score_answer(answer, q)
    ctx = traj.context
    n_orig = len(ctx.originals)
    crops = [dict(index=v.parent, bbox_2d=v.bbox, region=[round(x, 5) for x in v.region], size=list(v.display),
                  query=ctx.queries[v.group]) for v in ctx.views[n_orig:]]
    calls = [t.tool for t in map(parse_turn, traj.turns) if t.tool is not None]
    return dict(question_id=q["qid"], response=response, answer=answer, prediction=pred, score=s,
                gold=q["answer"], problem_type=q["meta"].get("problem_type"), mode=mode, finish=traj.finish,
                n_tool_calls=traj.n_tool_calls, n_invalid=traj.n_invalid, tool_errors=traj.errors,
                tool_calls=calls, crops=crops, turns=traj.turns, max_tool_calls=t_max,
                image_sizes=[list(v.display) for v in ctx.views[:n_orig]], n_new_tokens=sum(traj.policy_mask))


def run_bench(args, model, ct, questions, name, out, mode, tokens, rank, world, budget):
    """Answer this rank's share of `questions`, appending to this rank's results file.
    Returns the summary when all questions (all ranks) are done, else None."""
    own = out if world == 1 else "{0}.rank{2}{1}".format(*os.path.splitext(out), rank)
    done, _ = read_results(results_files(out))
    setting = (mode, tokens, not args.no_inquiry, args.blank_crops, args.initial_groups, args.initial_inquiry)
    describe = "mode {!r}, {} visual tokens, inquiry {}, blank crops {}, initial groups {}, initial inquiry {}".format
    for line in done.values():  # one file = one setting; mixing would make the scores meaningless
        had = (line.get("mode", "chat"), line.get("max_visual_tokens", tokens), line.get("inquiry", True),
               line.get("blank_crops", False), line.get("initial_groups", "per-image"),
               line.get("initial_inquiry", "none"))
        if had != setting:
            raise SystemExit(f"{out} holds results of {describe(*had)}; this run is {describe(*setting)}: "
                             f"pass another --out")
    todo = [(i, q) for i, q in enumerate(questions) if i % world == rank
            and (str(q["qid"]) not in done or done[str(q["qid"])].get("error") is not None)]
    print(f"[rank {rank}] {name} ({mode}, {tokens} visual tokens): {len(todo)} to do, "
          f"{sum(i % world == rank for i in range(len(questions))) - len(todo)} already done -> {own}")
    limits = rollout.Limits(max_tool_calls=5, max_images=args.max_images, max_turn_tokens=args.max_turn_tokens,
                            max_new_tokens=args.max_new_tokens, max_context=args.max_context)
    common = dict(mode=mode, max_visual_tokens=tokens, inquiry=not args.no_inquiry, blank_crops=args.blank_crops,
                  initial_groups=args.initial_groups, initial_inquiry=args.initial_inquiry,
                  model=os.path.abspath(args.model) if args.model else None)
    writer = ResultsWriter(own)
    try:
        for start in range(0, len(todo), args.batch_size):
            batch, ready = todo[start:start + args.batch_size], []
            for i, q in batch:  # load images: a missing one fails this question only
                if "error" in q:
                    writer.write(dict(question_id=q["qid"], response=None, error=q["error"], **common))
                    print(f"[rank {rank}] {q['qid']}: FAILED {q['error']}")
                    continue
                try:
                    imgs = [load_image(os.path.join(args.image_root, p)) for p in q["images"]]
                except (OSError, ValueError) as e:
                    writer.write(dict(question_id=q["qid"], response=None, error=f"image: {e}", **common))
                    print(f"[rank {rank}] {q['qid']}: FAILED {e}")
                    continue
                t_max = args.max_tool_calls  # --max-tool-calls > the record's own > the benchmark's (paper)
                if t_max is None:
                    t_max = q["max_tool_calls"] if q["max_tool_calls"] is not None else default_tool_limit(name) or 5
                if mode != "chat":
                    t_max = 0
                # a record's own per-image budget (our JSONL schema) is what it was made for; a sweep overrides it
                max_pixels = None if args.sweep else q["max_pixels"]
                # sampled answers follow the question, not its batch: a resumed run redraws them alike
                prompt = dataclasses.replace(make_prompt(q, imgs, mode, t_max, max_pixels, data.Initial.from_args(args)),
                                             seed=zlib.crc32(f"{args.seed}:{q['qid']}".encode()))
                ready.append((i, q, prompt, t_max))
            _answer(args, model, ct, ready, mode, budget, limits, writer, common, rank)
    finally:
        writer.close()
    lines, bad = read_results(results_files(out))
    missing = sum(str(q["qid"]) not in lines for q in questions)
    if bad:
        print(f"{out}: skipped {bad} unreadable line(s)")
    if missing:
        print(f"[rank {rank}] {missing} questions not done yet (other ranks still running?): "
              f"run `python eval.py --score {out} --bench ...` when they finish")
        return None
    return summarize(name, questions, lines)


def _answer(args, model, ct, ready, mode, budget, limits, writer, common, rank):
    """One batched rollout of `ready` [(index, question, Prompt, T_max)]. If it raises (CUDA OOM,
    a prompt over --max-context, ...), each question is retried alone, so a bad question fails
    alone, with its reason in its line; nothing stops the run."""
    if not ready:
        return
    sampling = rollout.Sampling(temperature=args.temperature, top_p=args.top_p, greedy=args.greedy)
    t0 = time.time()
    try:
        trajs = rollout.rollout(model, ct, [p for _, _, p, _ in ready], 1, sampling, limits, budget,
                                inquiry=not args.no_inquiry, blank_crops=args.blank_crops)
    except Exception as e:  # noqa: BLE001: recorded per question, never fatal
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(ready) > 1:
            print(f"[rank {rank}] batch failed ({type(e).__name__}: {e}); retrying its questions one by one")
            for r in ready:
                _answer(args, model, ct, [r], mode, budget, limits, writer, common, rank)
            return
        q = ready[0][1]
        writer.write(dict(question_id=q["qid"], response=None, error=f"{type(e).__name__}: {str(e)[:500]}", **common))
        print(f"[rank {rank}] {q['qid']}: FAILED {type(e).__name__}: {e}")
        return
    sec = (time.time() - t0) / len(ready)
    for (i, q, _, t_max), traj in zip(ready, trajs):
        line = trajectory_line(q, traj, mode, t_max)
        writer.write(dict(line, seconds=round(sec, 2), **common))
        print(f"[rank {rank}] {q['qid']}: score {line['score']:.2f} answer {str(line['answer'])[:30]!r} "
              f"gold {q['answer']!r} finish {traj.finish} tools {traj.n_tool_calls} ({sec:.1f}s)")


# -----------------------------------------------------------------------------
# the resolution sweep (paper Table 3 / Figure 4)


def sweep_report(name, summaries, stem, label="ours"):
    """summaries: {(mode, tokens): summary}. Writes <stem>.sweep.md and <stem>.sweep.png: a line
    per mode, and for HRBench-4K the paper's Table 3 lines (dashed) beside them."""
    modes = sorted({m for m, _ in summaries}, key=MODES.index)
    budgets = sorted({t for _, t in summaries})
    paper = list(PAPER_TABLE3) if name == "HRBench-4K" else []
    lines = [f"## {name}: score by total visual-token budget", "",
             "| Visual tokens | " + " | ".join(modes + paper) + " |", "|---" * (1 + len(modes) + len(paper)) + "|"]
    for t in budgets:
        row = [_fmt(summaries[(m, t)]["score"]) if (m, t) in summaries else "-" for m in modes]
        if name == "HRBench-4K":
            row += [_fmt(v.get(t)) for v in PAPER_TABLE3.values()]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    atomic_write(stem + ".sweep.md", "\n".join(lines) + "\n")
    series = {f"{label} ({m})": {t: summaries[(m, t)]["score"] for t in budgets if (m, t) in summaries} for m in modes}
    ref = PAPER_TABLE3 if name == "HRBench-4K" else None
    plots.plot_lines(series, stem + ".sweep.png", f"{name}: score vs. visual-token budget", "total visual tokens",
               "score (%)", ref)
    print("\n".join(lines))
    print(f"wrote {stem}.sweep.md and {stem}.sweep.png")


# -----------------------------------------------------------------------------
# attention maps (paper section 4.5.2, App. E.2)
#
# "Where the inquiry makes the encoder look": the paper takes the LAST vision layer's attention,
# averaged over heads, aggregated per patch. We aggregate as the attention each image patch
# RECEIVES from all image queries (column sums of softmax(q k^T / sqrt(d)) over the image keys),
# normalised to a distribution over patches. It exists with and without an inquiry (and for
# the vanilla ViT), so the two panels are directly comparable; the alternative, the mass image
# queries put on the text keys, is zero without an inquiry and has no vanilla counterpart.
# In ViLaVT's last layer (query-aware) the softmax runs over [image keys ; inquiry keys], so
# the inquiry shifts this distribution directly and through every earlier query-aware layer.


@torch.no_grad()
def attention_received(model, ct, img, query, max_pixels, chunk_elems=2 ** 27):
    """(h, w) patch grid of attention received in the last vision layer, summing to 1.
    The image is encoded as one group with `query` (as a zoom-in crop is re-encoded);
    query '' = no inquiry. Runs the encoder's own forward and recomputes that one layer's
    attention weights explicitly from its inputs (the SDPA path stays untouched)."""
    dev, dt = model.lm_head.weight.device, model.visual.patch_embed.proj.weight.dtype
    pv, grid = preprocess_image(img, MIN_PIXELS, max_pixels)
    qids, qmask = ct.queries([query])
    attn = model.visual.blocks[-1].attn
    captured = {}
    hook = attn.register_forward_pre_hook(lambda mod, a: captured.setdefault("args", a))
    try:
        model.encode_images(pv.to(dev, dt), grid[None].to(dev), qids.to(dev), qmask.to(dev), torch.tensor([0]))
    finally:
        hook.remove()
    x, lay, seg, text = captured["args"]  # VisionBlock calls attn(norm1(x), lay, seg, text)
    received, _ = encoder.explicit_attention(attn, x, lay, seg, text, chunk_elems=chunk_elems)
    grid_map = patch_grid(received, lay, grid, model.visual.cfg.spatial_merge_size)
    return (grid_map / grid_map.sum()).cpu().numpy()


def patch_grid(values, lay, grid_thw, m=2):
    """Per-patch values of one image in the encoder's window order (N,) -> its (h, w) patch grid.
    The encoder permutes 2x2 merge units into window order (lay.window_index); lay.reverse
    undoes that, and inside a unit the 4 patches are (dy, dx) in row-major order (data.py)."""
    _, h, w = (int(v) for v in grid_thw)
    unit = values.reshape(h * w // (m * m), m * m, *values.shape[1:])[lay.reverse]
    return unit.reshape(h // m, w // m, m, m, *values.shape[1:]).transpose(1, 2).reshape(h, w, *values.shape[1:])


def cmd_attn_map(args):
    model, ct = load_model(args)
    img = load_image(args.image)
    max_pixels = budget_per_crop(args.max_visual_tokens)  # as a re-encoded crop: the full budget
    with_q = attention_received(model, ct, img, args.query, max_pixels)
    without = attention_received(model, ct, img, "", max_pixels)
    out = args.out or "attn_map.png"
    note = "" if model.is_vilavt else " (vanilla ViT: the inquiry is ignored)"
    plots.attention_figure(img, [with_q, without], [f"inquiry: {args.query!r}{note}", "empty inquiry"], out)
    print(f"wrote {out} (patch grid {with_q.shape[0]}x{with_q.shape[1]})")


# -----------------------------------------------------------------------------
# main


def load_model(args):
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    model, ct = rollout.load(args.model, args.embedder, dtype=dtype, device=device)
    print(f"loaded {args.model}: {'ViLaVT' if model.is_vilavt else 'vanilla Qwen2.5-VL'}, {dtype}, {device}")
    return model, ct


def cmd_score(args):
    if not args.bench or len(args.bench) != len(args.score):
        raise SystemExit("--score needs one --bench file per results file, in the same order")
    summaries, labels = [], []
    for res, bench in zip(args.score, args.bench):
        lines, bad = read_results(results_files(res))
        if bad:
            print(f"{res}: skipped {bad} unreadable line(s)")
        questions = load_bench(bench, args.max_frames)
        unknown = set(lines) - {str(q["qid"]) for q in questions}
        if unknown:
            print(f"{res}: {len(unknown)} lines have question ids not in {bench}; ignored")
        summaries.append(summarize(bench_name(bench), questions, lines))
        labels.append(os.path.basename(res))
    md = markdown(summaries, labels=labels if len(set(s["name"] for s in summaries)) < len(summaries) else None)
    out = args.out or os.path.splitext(args.score[0])[0] + ".md"
    atomic_write(out, md)
    print(md + f"\nwrote {out}")
    return summaries


def cmd_run(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if len(args.bench) != 1:
        raise SystemExit("a run takes one --bench file (use --score to tabulate several)")
    bench = args.bench[0]
    args.image_root = args.image_root or os.path.dirname(os.path.abspath(bench))
    name = bench_name(bench)
    questions = load_bench(bench, args.max_frames)
    if args.limit is not None:
        questions = questions[:args.limit]
    modes = args.mode.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--mode {m!r}: one of {MODES}")
    budgets = [int(t) for t in args.sweep.split(",")] if args.sweep else [args.max_visual_tokens]
    out = args.out or os.path.join("out", "eval", re.sub(r"[^\w.-]", "_", name) + ".jsonl")
    stem, ext = os.path.splitext(out)
    model, ct = load_model(args)
    summaries = {}
    for tokens in budgets:
        for mode in modes:
            o = out if len(budgets) * len(modes) == 1 else f"{stem}.{mode}.tok{tokens}{ext}"
            s = run_bench(args, model, ct, questions, name, o, mode, tokens, rank, world,
                          data.Budget(total_tokens=tokens))  # each crop capped at the whole budget
            if s is not None:
                summaries[(mode, tokens)] = s
                md = markdown([s], title=f"Results: {name}, mode {mode}, {tokens} visual tokens")
                atomic_write(os.path.splitext(o)[0] + ".md", md)
                print(md)
    if args.sweep and len(summaries) == len(budgets) * len(modes):
        notes = next(iter(summaries.values()))["ablations"]
        sweep_report(name, summaries, stem, _label(os.path.basename(os.path.normpath(args.model)), notes))
    return summaries


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder: ViLaVT, or stock Qwen2.5-VL (vanilla)")
    p.add_argument("--embedder", help="Qwen3-Embedding folder, for a stock Qwen2.5-VL turned into ViLaVT")
    p.add_argument("--bench", nargs="+", help="benchmark file(s): the authors' .json list or our .jsonl records")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the benchmark's folder)")
    p.add_argument("--out", help="results .jsonl (a run), Markdown path (--score), PNG (--attn-map)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--mode", default="chat", help=f"one of {MODES}, or a comma list (with --sweep)")
    p.add_argument("--max-tool-calls", type=int, help="T_max; default 5 for HRBench, 10 for spatial sets (paper)")
    p.add_argument("--max-visual-tokens", type=int, default=TOTAL_VISUAL_TOKENS,
                   help="total visual-token budget of a question's images (paper: 8192)")
    p.add_argument("--sweep", help="comma list of --max-visual-tokens values (paper Table 3: 1024,2048,4096,8192)")
    p.add_argument("--max-frames", type=int, default=32, help="video records: frames sampled uniformly")
    p.add_argument("--no-inquiry", action="store_true", help="the paper's 'w/o inquiry' ablation: crops re-encoded "
                                                             "jointly but without the tool call's query")
    data.Initial.add_args(p)
    p.add_argument("--blank-crops", action="store_true", help="every crop a flat grey image of the real crop's size: "
                                                              "what answers owe to what the crops show")
    # sampling (paper App. C: top-p 0.9, T 0.75)
    p.add_argument("--temperature", type=float, default=0.75)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    # limits
    p.add_argument("--batch-size", type=int, default=8, help="questions decoded together per rank (default 8)")
    p.add_argument("--max-turn-tokens", type=int, default=1024, help="generated tokens per assistant turn "
                                                                      "(default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=8192, help="generated tokens per question (default 8192)")
    p.add_argument("--max-context", type=int, default=32768, help="KV-cache slots per question (default 32768)")
    p.add_argument("--max-images", type=int, default=52, help="visual inputs per trajectory (paper: 52)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), help="default: bf16 on GPU, fp32 on CPU")
    # the other commands
    p.add_argument("--score", nargs="+", metavar="RESULTS", help="recompute scores from results file(s), no model")
    p.add_argument("--attn-map", action="store_true", help="draw the last vision layer's attention (needs --image)")
    p.add_argument("--image", help="--attn-map: the image")
    p.add_argument("--query", default="", help="--attn-map: the inquiry")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.score:
        return cmd_score(args)
    if not args.model:
        raise SystemExit("--model is required (except with --score)")
    if args.attn_map and not args.image:
        raise SystemExit("--attn-map needs --image")
    if not args.attn_map and not args.bench:
        raise SystemExit("--bench is required")
    with torch.no_grad():
        return cmd_attn_map(args) if args.attn_map else cmd_run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
