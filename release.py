"""
The importer of the authors' released SFT records (ViLaVT-Data, SPEC 7) into our record schema:
`sft.py --import-release` converts the release's file with import_release. Its own file because
it is a format converter, read by nothing else; the records it writes are plain data.py records,
keeping the release's verbatim texts (system, user prompt, assistant turns, observations) and
its pre-made crop files.
"""

import json

from data import RecordError, _fail
from model import atomic_write
from reward import parse_turn


def import_release_record(rec, where):
    """A ViLaVT-Data record ({images, conversations, queries, image_to_query_mapping,
    max_pixels?, mask_history?}) -> our schema, keeping the release's texts verbatim
    (system, user prompt, assistant turns, observations) and its pre-made crop files.
    mask_history is not reproduced: we train on every assistant turn."""
    conv, images = rec.get("conversations"), rec.get("images")
    if not isinstance(conv, list) or not conv:
        _fail(where, "conversations", "must be a non-empty list")
    if not isinstance(images, list):
        _fail(where, "images", "must be a list of paths")
    mapping = rec.get("image_to_query_mapping", list(range(len(images))))
    queries = rec.get("queries", [""] * len(images))
    if len(mapping) != len(images):
        _fail(where, "image_to_query_mapping", f"{len(mapping)} entries for {len(images)} images")
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            _fail(where, f"conversations[{k}].value", "must be a string (each turn: {from, value})")
    out = {"images": [], "question": "", "steps": [], "source": where}  # errors later name the release's record
    turns = list(conv)
    off = 0  # conversations[k] in messages counts the system turn
    if turns[0].get("from") == "system":
        out["system"], off = turns.pop(0)["value"], 1
    if not turns or turns[0].get("from") != "human":
        _fail(where, "conversations", "must start with a human turn (after an optional system turn)")
    user = turns[0]["value"]
    n_orig = user.count("<image>")
    if n_orig > len(images):
        _fail(where, "images", f"the first human turn places {n_orig} <image>s but the record has {len(images)} images")
    out["images"], out["prompt"] = images[:n_orig], user
    out["question"] = user.replace("<image>", "").strip()
    next_image, steps = n_orig, []
    for j in range(1, len(turns)):
        t, k = turns[j], j + off
        if t.get("from") == "gpt":
            step = {"text": t["value"]}
            turn = parse_turn(t["value"])
            if turn.tool is not None:
                step["tool"] = dict(turn.tool)
            elif turn.answer is not None:
                step["answer"] = turn.answer
            else:
                _fail(where, f"conversations[{k}]", f"assistant turn is neither a tool call nor an answer ({turn.error})")
            steps.append(step)
        elif t.get("from") == "human":
            if not steps or "tool" not in steps[-1]:
                _fail(where, f"conversations[{k}]", "a human turn must follow a tool call")
            n = t["value"].count("<image>")
            crops = images[next_image:next_image + n]
            if len(crops) != n:
                _fail(where, "images", f"conversations[{k}] places {n} <image>s but only {len(crops)} images are left")
            groups = set(mapping[next_image:next_image + n])
            if len(groups) != 1:
                _fail(where, "image_to_query_mapping", f"crops of conversations[{k}] do not form one query group")
            steps[-1]["crops"], steps[-1]["observation"] = crops, t["value"]
            g = groups.pop()
            if not isinstance(g, int) or not 0 <= g < len(queries) or not isinstance(queries[g], str):
                _fail(where, "queries", f"no query string for group {g!r} of conversations[{k}]")
            steps[-1]["tool"]["query"] = queries[g]  # what the release's encoder saw
            next_image += n
        else:
            _fail(where, f"conversations[{k}].from", f"unknown role {t.get('from')!r}")
    if next_image != len(images):  # the release's loader would have failed on it; we never drop data silently
        _fail(where, "images", f"{len(images) - next_image} of {len(images)} images are placed by no <image>")
    out["steps"] = steps
    out["max_tool_calls"] = sum("tool" in s for s in steps[:-1]) if steps else 0
    if "max_pixels" in rec:
        out["max_pixels"] = rec["max_pixels"]
    return out



def import_release(src, dst, skip_bad=False, log=print):
    """The release's records (a JSON list, or JSONL) -> our JSONL via data.import_release_record.
    Returns (records written, records skipped)."""
    with open(src) as f:
        text = f.read()
    try:
        recs = json.loads(text)
        items = [(f"{src}[{i}]", r) for i, r in enumerate(recs if isinstance(recs, list) else [recs])]
    except json.JSONDecodeError:  # JSONL: one record per line
        items = [(f"{src}:{i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    n_bad, out = 0, []
    for where, rec in items:
        try:
            if isinstance(rec, str):
                try:
                    rec = json.loads(rec)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: malformed JSON ({e})") from None
            if not isinstance(rec, dict):
                raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            out.append(json.dumps(import_release_record(rec, where)) + "\n")
        except RecordError as e:
            if not skip_bad:
                raise
            n_bad += 1
            log(f"skipping bad release record: {e}")
    atomic_write(dst, "".join(out))
    return len(items) - n_bad, n_bad
