"""
The zoom world's instruments: the demo's results table and the probes of its models.

    demo_metrics    a run's table row from eval.py's results lines and the records' scenes
                    (box hit: does the crop hold the target card?)
    probe_model     the sub-skills a chat trajectory strings together (copy, grounding,
                    reading, option), teacher-forced on held-out records, and the visual
                    features' spread against their shared mean (the collapse issue 12 measured)
    probe_perception  the perception stages' own skills on held-out perception records

Its own file because zoom_world.py holds the world and the driver, the data and the commands a
user types; these read what the scripts wrote (results, checkpoints) and score it. They know the
world's sentences and grid, so this file imports zoom_world (the driver imports it back lazily).
"""

import json
import statistics

import torch

from data import ENCODER_KEYS, read_jsonl, render_sample
from eval import final_answer, score_answer
from reward import format_ok
from training import padded_forward
from zoom_scenes import COLORS, mark_values
from zoom_world import _KIND, TEXT, ZoomWorldConfig, _cell_place

# -----------------------------------------------------------------------------
# the results table

COLUMNS = (("accuracy", "Acc (MC)"), ("mra", "MRA (num.)"), ("score", "All"), ("format_rate", "Format"),
           ("tool_calls", "Tools/q"), ("box_hit_rate", "Box hit"), ("accuracy_multi_image", "Acc multi-img"))


def covers(region, box, eps=1e-6):
    """A normalised region (x1, y1, x2, y2) holds all of box."""
    return (region[0] <= box[0] + eps and region[1] <= box[1] + eps and region[2] >= box[2] - eps
            and region[3] >= box[3] - eps)


def demo_metrics(questions, lines):
    """The table's columns of one run, from its results lines and the zoom world's records
    (q["meta"]: category, target_boxes). In percent: accuracy (MC questions), mra (numerical,
    the benchmark MRA), score (all), format_rate (R_format, SPEC 5), box_hit_rate (boxes of valid
    calls whose crop holds its image's target card; images without a target do not count),
    accuracy_multi_image (multi-image questions exactly right); tool_calls per question, valid
    or not. A failed question scores 0, has no valid format and no tool calls."""
    mc, num, fmt, calls, multi, boxes = [], [], [], [], [], []
    for q in questions:
        line = lines[str(q["qid"])]
        ok = line.get("error") is None
        s = question_score(q, lines)
        (mc if q["kind"] == "multiple choice" else num).append(s)
        if q["meta"].get("category") == "multi":
            multi.append(s == 1.0)
        if not ok:
            fmt.append(False), calls.append(0)
            continue
        sizes = [tuple(x) for x in line["image_sizes"]] + [tuple(c["size"]) for c in line["crops"]]
        fmt.append(format_ok(line["turns"], sizes)[0])
        calls.append(line["n_tool_calls"])
        sources = list(range(len(line["image_sizes"])))  # the original each image is cut from
        for c in line["crops"]:
            sources.append(sources[c["index"]])
            target = q["meta"]["target_boxes"][sources[-1]]
            if target is not None:
                boxes.append(covers(c["region"], target))
    return dict(n=len(questions), accuracy=pct(mc), mra=pct(num), score=pct(mc + num), format_rate=pct(fmt),
                tool_calls=statistics.fmean(calls), box_hit_rate=pct(boxes), accuracy_multi_image=pct(multi),
                n_boxes=len(boxes), n_multi_image=len(multi),
                accuracy_ci95=ci95(mc), score_ci95=ci95(mc + num), box_hit_rate_ci95=ci95(boxes))


def fmt(x):
    """A percentage with one decimal, or "-" for none."""
    return "-" if x is None else f"{x:.1f}"


def pct(v):
    """The mean of scores in [0, 1] as a percentage (None for none)."""
    return 100 * statistics.fmean(v) if v else None


def ci95(v):
    """The 95% interval's half-width of pct(v), in points: the normal approximation over the items."""
    return 100 * 1.96 * statistics.pstdev(v) / len(v) ** 0.5 if len(v) > 1 else None


def question_score(q, lines):
    """A question's score from its results line (eval.py's metric); a failed or missing one scores 0."""
    line = lines.get(str(q["qid"]))
    if line is None or line.get("error") is not None:
        return 0.0
    return score_answer(final_answer(line["response"], line["mode"]), q)[0]


# -----------------------------------------------------------------------------
# probes: the sub-skills a chat trajectory strings together, teacher-forced on held-out records
#
# Each probe takes a held-out single-image zoom record, keeps its gold trajectory (gold boxes,
# gold crops) and swaps one slot of one gold think for each candidate value; the model's choice
# is the candidate whose slot tokens it finds most likely, after the same prefix. So a probe
# measures one skill in isolation: what the model would write there if everything before it
# were right. copy: the card's colour, named in the question ("The question is about the {color}
# card"); grounding: the cell of that card in the initial view ("which is {place}"), the skill
# the bbox follows from; reading: the mark's value seen in the gold crop ("the red card has
# {value} dots"), after the zoom; option (multiple-choice records only): the letter of that value
# among the question's options ("That is option {letter}"), a look-up in the prompt's text.

PROBES = ("copy", "grounding", "reading", "option")


def probe_candidates(rec, cfg=ZoomWorldConfig()):
    """{probe: (records, index of the gold one)} for one record: copies of rec whose gold steps
    differ only in the probe's slot; {} for a record no probe applies to (multi-image, text-only,
    crop of crop, direct)."""
    if rec.get("category") != "single" or rec["task"].endswith("-zoom2") or rec.get("mode") == "direct":
        return {}
    card = next(c for c in rec["scene"][0] if c["color"] in rec["question"].split())
    color, place = card["color"], rec["steps"][0]["think"].split("which is ")[1].split(" of image")[0]
    words = dict(_KIND[rec["mark"]], color=color)
    places = [_cell_place(cfg, c, r) for r in range(cfg.grid[1]) for c in range(cfg.grid[0])]
    values = mark_values(cfg, rec["mark"])

    def swap(k, think):
        steps = [dict(s) for s in rec["steps"]]
        steps[k]["think"] = think
        return dict(rec, steps=steps)

    zoom = lambda c, p: TEXT["t_zoom"].format(place=p, index=0, **dict(words, color=c))  # noqa: E731
    last = len(rec["steps"]) - 1
    read = lambda v: rec["steps"][last]["think"].replace(  # noqa: E731
        TEXT[f"t_read_{rec['mark']}"].format(k=1, value=card["value"], **words),
        TEXT[f"t_read_{rec['mark']}"].format(k=1, value=v, **words))
    out = {"copy": ([swap(0, zoom(c, place)) for c in COLORS], list(COLORS).index(color)),
           "grounding": ([swap(0, zoom(color, p)) for p in places], places.index(place)),
           "reading": ([swap(last, read(v)) for v in values], values.index(card["value"]))}
    if rec.get("options"):  # multiple choice: the think's value looked up among the question's options
        think, letters = rec["steps"][last]["think"], [o.split(".")[0] for o in rec["options"]]
        stem = think[:-len(TEXT["t_option"].format(letter=rec["answer"]))]
        out["option"] = ([swap(last, stem + TEXT["t_option"].format(letter=x)) for x in letters],
                         letters.index(rec["answer"]))
    return out


def slot_scores(model, samples):
    """(n,) summed log-probs of each candidate's slot: the token span where the candidates' ids
    differ (their common prefix and suffix are left out), teacher-forced in one padded batch
    (right padding is inert under causal attention)."""
    rows = [s["input_ids"].tolist() for s in samples]
    pre = _common_prefix(rows)
    suf = _common_prefix([row[pre:][::-1] for row in rows])
    with torch.no_grad():
        x, h = padded_forward(model, rows, [{k: s[k] for k in ENCODER_KEYS} for s in samples], "cpu", share=True)
        targets = torch.full(x.shape, -100)
        for b, row in enumerate(rows):
            targets[b, pre - 1:len(row) - suf - 1] = x[b, pre:len(row) - suf]  # position t predicts token t+1
        return model.token_logprobs(h, targets).sum(1)


def _common_prefix(rows):
    """Length of the longest prefix all rows share."""
    n = min(map(len, rows))
    return next((i for i in range(n) if len({row[i] for row in rows}) > 1), n)


def probe_model(model, ct, bench, image_root, limit=None):
    """{probe: accuracy in percent, "n": records probed} for a model (in eval mode; rollout.load
    gives it and its ChatTokenizer ct) on held-out records."""
    right, spread, mean = {p: [] for p in PROBES}, [], []
    probed = [(where, probes) for where, rec in read_jsonl(bench)[0] if (probes := probe_candidates(rec))][:limit]
    for where, probes in probed:
        for p, (cands, gold) in probes.items():
            samples = [render_sample(c, where, image_root, ct) for c in cands]
            right[p].append(int(slot_scores(model, samples).argmax()) == gold)
        v = samples[0]["context"].views[0]  # the original, as the initial view encodes it
        with torch.no_grad():
            f = model.encode_images(v.pixel_values, v.grid_thw[None])
        spread.append(float(f.std(0).mean())), mean.append(float(f.mean(0).abs().mean()))
    # the issue's instrument: the visual tokens' variation across one image's tokens against the
    # magnitude of their shared mean (a collapse grows the mean while the variation stays)
    return dict({p: pct(v) for p, v in right.items()}, n=len(probed), n_option=len(right["option"]),
                feature_spread=statistics.fmean(spread), feature_mean=statistics.fmean(mean))


def probe_perception(model, ct, path, image_root, limit=None, cfg=ZoomWorldConfig()):
    """{"ground": %, "read": %, "n": records} of a model (as probe_model's) on held-out
    make_perception records, scored like the probes: the place of image 0's card among the grid's
    cells, the dots among dot_count's values, each the candidate the model finds most likely."""
    places = [_cell_place(cfg, c, r) for r in range(cfg.grid[1]) for c in range(cfg.grid[0])]
    values = mark_values(cfg, "dots")
    right = {"ground": [], "read": []}
    for where, rec in read_jsonl(path, need_steps=True, need_answer=False)[0][:limit]:
        think = rec["steps"][0]["think"]
        if rec["task"] == "ground":
            color = next(c for c in COLORS if c in rec["question"].split())
            n = len(rec["images"])  # the sentence up to the places, which follow
            head = TEXT["t_where_multi" if n > 1 else "t_where"].format(color=color, n=n, places="")[:-1]
            gold = next(p for p in places if think.startswith(f"{head}{p} of image 0"))
            thinks = [f"{head}{p}{think[len(head) + len(gold):]}" for p in places]
            k = places.index(gold)
        else:
            v = int(rec["steps"][0]["answer"])
            thinks, k = [think.replace(f"has {v} dots", f"has {u} dots") for u in values], values.index(v)
        cands = [dict(rec, steps=[dict(rec["steps"][0], think=t)]) for t in thinks]
        samples = [render_sample(c, where, image_root, ct) for c in cands]
        right[rec["task"]].append(int(slot_scores(model, samples).argmax()) == k)
    return dict({t: 100 * statistics.fmean(v) for t, v in right.items() if v}, n=sum(map(len, right.values())))


def train_reward_fifths(log_path):
    """Mean GRPO training reward over the first and the last fifth of its steps (at least one
    step each), from grpo.py's log.jsonl."""
    with open(log_path) as f:
        rewards = [json.loads(ln)["reward"] for ln in f if ln.strip()]
    k = max(1, len(rewards) // 5)
    return dict(train_reward_first_fifth=statistics.fmean(rewards[:k]), train_reward_last_fifth=statistics.fmean(rewards[-k:]))


def demo_table(rows):
    """The rows as Markdown; a column with a 95% interval (k_ci95) shows it as +- its half-width."""
    cell = lambda r, k: fmt(r[k]) + (f" ± {r[k + '_ci95']:.1f}" if r.get(k + "_ci95") is not None else "")  # noqa: E731
    head = "| Row | " + " | ".join(t for _, t in COLUMNS) + " | Questions |"
    out = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k == "tool_calls" else cell(r, k) for k, _ in COLUMNS]
        out.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['n']} |")
    return "\n".join(out) + "\n"
