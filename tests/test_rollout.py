"""Rollout: a scripted policy reproduces data.py's rendering token for token; batching, G
copies, limits and invalid calls; log-probs recomputed on the returned tokens match."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import pixels
import rollout
from data import Budget, ChatTokenizer
from model import ViLaVT, tiny_config
from scripted import Scripted



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # scoped: a module-level set_grad_enabled(False) would leak into other test files
        yield

BUDGET = Budget(max_pixels=224 * 224, crop_max_pixels=112 * 112)


@pytest.fixture(scope="module")
def ct(tokenizer):
    return ChatTokenizer(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    m.init_weights()
    return m.eval()


def noise_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


TWO_CALLS = {
    "images": ["a.png", "b.png"], "question": "How many dots are on the red card?", "options": None,
    "problem_type": "numerical", "answer": "3", "max_tool_calls": 5,
    "steps": [
        {"think": "The red card is small; zoom on it.",
         "tool": {"region": [{"index": 0, "bbox_2d": [28, 28, 140, 112]}, {"index": 1, "bbox_2d": [0, 0, 56, 56]}],
                  "query": "count the dots on the red card"}},
        {"think": "Closer, on the first crop.",
         "tool": {"region": [{"index": 2, "bbox_2d": [10, 10, 50, 40]}], "query": "the dots"}},
        {"think": "I count three dots.", "answer": "3"},
    ],
}


def policy_tokens(ct, steps):
    """What a policy writes for these steps: tool turns end at </tool> (the environment closes
    the turn), the final turn ends with <|im_end|>."""
    out = []
    for s in steps:
        out += ct.encode(data.assistant_text(s)) + ([] if "tool" in s else [ct.im_end])
    return out


def test_scripted_trajectory_equals_rendering(tmp_path, model, ct):
    imgs = [noise_image(448, 336, 1), noise_image(300, 300, 2)]
    for name, im in zip(TWO_CALLS["images"], imgs):
        im.save(tmp_path / name)
    gold = data.render_sample(TWO_CALLS, "gold", str(tmp_path), ct, BUDGET)
    prompt = rollout.Prompt([pixels.load_image(str(tmp_path / n)) for n in TWO_CALLS["images"]], TWO_CALLS["question"])
    traj = rollout.rollout(Scripted(model, [policy_tokens(ct, TWO_CALLS["steps"])]), ct, [prompt], budget=BUDGET)[0]
    assert traj.finish == "answer" and traj.answer == "3" and traj.n_tool_calls == 2 and traj.n_invalid == 0
    assert traj.ids == gold["input_ids"].tolist()
    assert ct.decode(traj.ids) == gold["text"]
    # the mask is the SFT label mask, except the <|im_end|> closing a tool turn, which the
    # environment writes in a rollout (it is trained in SFT)
    labels = gold["labels"].tolist()
    expected = [int(l != -100) for l in labels]
    for i in range(1, len(traj.ids)):
        if traj.ids[i] == ct.im_end and ct.decode(traj.ids[max(0, i - 3):i]).endswith("</tool>"):
            expected[i] = 0
    assert traj.policy_mask == expected
    # crops, groups and queries
    views = traj.context.views
    assert [v.group for v in views] == [0, 1, 2, 2, 3]
    assert traj.context.queries == ["", "", "count the dots on the red card", "the dots"]
    assert [(v.parent, v.bbox) for v in views[2:]] == [(0, [28, 28, 140, 112]), (1, [0, 0, 56, 56]), (2, [10, 10, 50, 40])]
    enc, genc = traj.encoder_inputs(ct), {k: gold[k] for k in ("pixel_values", "grid_thw", "image_to_query", "query_ids")}
    for k, v in genc.items():
        assert torch.equal(enc[k], v), k
    # the crop of a crop maps back to the original: the 448x336 original is displayed at
    # 252x168 (smart_resize under 224*224 pixels); crop 2 covers x 28..140 of those 252 px;
    # its own bbox x 10..50 is in crop 2's display width W2
    assert views[0].display == (252, 168)
    W2 = views[2].display[0]
    x1 = 28 / 252 + 10 / W2 * (112 / 252)
    assert views[4].region[0] == pytest.approx(x1)


def test_no_inquiry_blanks_the_query_at_re_encoding_only(model, ct):
    """inquiry=False (the paper's "w/o inquiry"): the same tokens and crop groups, the crops
    encoded with no query tokens, hence other features for the turns after the first call."""
    prompt = rollout.Prompt([noise_image(448, 336, 1), noise_image(300, 300, 2)], TWO_CALLS["question"])
    script = policy_tokens(ct, TWO_CALLS["steps"])
    sa, sb = Scripted(model, [script]), Scripted(model, [script])
    a = rollout.rollout(sa, ct, [prompt], budget=BUDGET)[0]
    b = rollout.rollout(sb, ct, [prompt], budget=BUDGET, inquiry=False)[0]
    assert b.ids == a.ids and b.turns == a.turns and [v.group for v in b.context.views] == [0, 1, 2, 2, 3]
    assert b.context.queries == [""] * 4 and a.context.queries[2:] == ["count the dots on the red card", "the dots"]
    assert b.encoder_inputs(ct)["query_mask"].sum() == 0 < a.encoder_inputs(ct)["query_mask"].sum()
    fa, fb = (model.encode_images(**t.encoder_inputs(ct)) for t in (a, b))
    n_orig = sum(int(g.prod()) for g in a.encoder_inputs(ct)["grid_thw"][:2]) // 4  # merged tokens of the originals
    assert torch.equal(fa[:n_orig], fb[:n_orig]) and (fa[n_orig:] - fb[n_orig:]).abs().max() > 1e-5  # (random weights)
    first = sum(a.policy_mask[:a.ids.index(ct.im_end, a.prompt_len)])  # policy tokens up to the first observation
    la, lb = sa.logprobs(0, a), sb.logprobs(0, b)
    assert torch.equal(la[:first], lb[:first]) and not torch.equal(la, lb)


INITIALS = {(j, q): data.Initial(joint=j, inquiry=q) for j in (False, True) for q in (False, True)}


def test_initial_encoding_groups_and_inquiry(tmp_path, model, ct, tokenizer):
    """data.Initial (section 4.4's single pass): SFT's rendering and the rollout group the originals
    alike, and put the bare question in as their inquiry; the default is today's initial encoding
    exactly (each original alone, no inquiry), and each switch changes the originals' features on
    ViLaVT, and nothing on the vanilla encoder, which has neither path."""
    imgs = [noise_image(448, 336, 1), noise_image(300, 300, 2)]
    for name, im in zip(TWO_CALLS["images"], imgs):
        im.save(tmp_path / name)
    q, script = TWO_CALLS["question"], policy_tokens(ct, TWO_CALLS["steps"])
    torch.manual_seed(0)
    vanilla = ViLaVT(tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>"), vanilla=True))
    vanilla.init_weights()
    feats, vfeats, dists = {}, {}, {}
    for (joint, inq), initial in INITIALS.items():
        gold = data.render_sample(TWO_CALLS, "gold", str(tmp_path), ct, BUDGET, initial)
        prompt = rollout.Prompt(imgs, q, initial=initial, inquiry=q)
        sc = Scripted(model, [script])
        traj = rollout.rollout(sc, ct, [prompt], budget=BUDGET)[0]
        assert traj.ids == gold["input_ids"].tolist() and traj.finish == "answer"
        assert [v.group for v in traj.context.views] == ([0, 0, 1, 1, 2] if joint else [0, 1, 2, 2, 3])
        assert traj.context.queries[:1 if joint else 2] == [q if inq else ""] * (1 if joint else 2)
        assert traj.context.queries[-2:] == ["count the dots on the red card", "the dots"]
        enc = traj.encoder_inputs(ct)
        for k in data.ENCODER_KEYS:
            assert torch.equal(enc[k], gold[k]), (joint, inq, k)
        orig = traj.context.encoder_inputs(traj.context.views[:2], ct)  # the rollout's prefill encodes these
        feats[joint, inq], vfeats[joint, inq] = model.encode_images(**orig), vanilla.encode_images(**orig)
        dists[joint, inq] = sc.logprobs(0, traj)
    # the default is the initial encoding as it was before Initial: each original its own group, no inquiry
    views = traj.context.views[:2]
    before = dict(pixel_values=torch.cat([v.pixel_values for v in views]), grid_thw=torch.stack([v.grid_thw for v in views]),
                  image_to_query=torch.tensor([0, 1]), **dict(zip(("query_ids", "query_mask"), ct.queries(["", ""]))))
    assert torch.equal(feats[False, False], model.encode_images(**before))
    alone = torch.cat([model.encode_images(v.pixel_values, v.grid_thw[None]) for v in views])  # one call each
    assert torch.allclose(feats[False, False], alone, atol=1e-6)
    keys = list(INITIALS)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:  # joint grouping and the inquiry each change the features (random weights)
            assert (feats[a] - feats[b]).abs().max() > 1e-5, (a, b)
            assert not torch.equal(dists[a], dists[b]), (a, b)
            assert torch.allclose(vfeats[a], vfeats[b], atol=1e-6), (a, b)  # float noise of the batching at most


def test_blank_crops_keep_sizes_and_tokens_not_pixels(model, ct):
    """blank_crops=True: every crop (a crop of a crop too) is flat grey of the real crop's size, so
    the same token ids, grids, regions and queries, other pixels; with inquiry=False as well, the
    queries go too and the crops stay grey."""
    prompt = rollout.Prompt([noise_image(448, 336, 1), noise_image(300, 300, 2)], TWO_CALLS["question"])
    script = policy_tokens(ct, TWO_CALLS["steps"])
    a, b, c = (rollout.rollout(Scripted(model, [script]), ct, [prompt], budget=BUDGET, **kw)[0]
               for kw in ({}, dict(blank_crops=True), dict(blank_crops=True, inquiry=False)))
    ea, eb, ec = (t.encoder_inputs(ct) for t in (a, b, c))
    assert b.ids == a.ids == c.ids and b.finish == "answer" and b.n_invalid == 0
    assert torch.equal(eb["grid_thw"], ea["grid_thw"]) and torch.equal(ec["grid_thw"], ea["grid_thw"])
    assert [(v.region, v.display, v.bbox, v.parent, v.group) for v in b.context.views] == \
        [(v.region, v.display, v.bbox, v.parent, v.group) for v in a.context.views]
    assert b.context.queries == a.context.queries and c.context.queries == [""] * 4
    grey = torch.tensor([(128 / 255 - m) / s for m, s in zip(pixels.OPENAI_CLIP_MEAN, pixels.OPENAI_CLIP_STD)])
    for t in (b, c):
        views = t.context.views
        for va, v in zip(a.context.views[:2], views[:2]):  # the originals are untouched
            assert torch.equal(v.pixel_values, va.pixel_values)
        for va, v in zip(a.context.views[2:], views[2:]):
            per_channel = v.pixel_values.view(-1, 3, 2 * 14 * 14)  # rows are (channel, temporal, 14, 14)
            assert torch.allclose(per_channel, grey.view(1, 3, 1).expand_as(per_channel), atol=1e-6)
            assert (v.pixel_values - va.pixel_values).abs().max() > 0.5


def test_logprobs_recomputed_on_returned_tokens(tmp_path, model, ct):
    """No decode-then-retokenize drift: a full forward over traj.ids (all images re-encoded in
    their groups) gives the decode steps' log-probs (KV cache, observation prefills) at every
    policy token."""
    prompt = rollout.Prompt([noise_image(448, 336, 1), noise_image(300, 300, 2)], TWO_CALLS["question"])
    policy = Scripted(model, [policy_tokens(ct, TWO_CALLS["steps"])])
    traj = rollout.rollout(policy, ct, [prompt], budget=BUDGET)[0]
    ids = torch.tensor([traj.ids])
    h = model.hidden_states(ids, **traj.encoder_inputs(ct))
    lp = model.token_logprobs(h[:, :-1], ids[:, 1:])[0]
    mask = torch.tensor(traj.policy_mask[1:], dtype=torch.bool)
    assert (lp[mask] - policy.logprobs(0, traj)).abs().max() <= 1e-4


def prompts_of(n):
    sizes = [(448, 336), (300, 300), (200, 400), (520, 260)]
    return [rollout.Prompt([noise_image(*sizes[i % 4], 10 + i)] + ([noise_image(250, 250, 20 + i)] if i % 2 else []),
                           f"Question number {i}?") for i in range(n)]


def test_batched_equals_one_at_a_time_and_group_copies(model, ct):
    lim = rollout.Limits(max_turn_tokens=12, max_new_tokens=12)
    greedy = rollout.Sampling(greedy=True)
    ps = prompts_of(3)
    rec = Scripted(model)  # records the decode steps' log-probs, lets the sampler choose
    batched = rollout.rollout(rec, ct, ps, group_size=2, sampling=greedy, limits=lim, budget=BUDGET)
    for b, p in enumerate(ps):
        one = Scripted(model)
        single = rollout.rollout(one, ct, [p], sampling=greedy, limits=lim, budget=BUDGET)[0]
        for g in range(2):
            t = batched[b * 2 + g]
            assert t.ids == single.ids and t.policy_mask == single.policy_mask
            assert torch.allclose(rec.logprobs(b * 2 + g, t), one.logprobs(0, single), atol=1e-4)


def test_sampling_is_seeded(model, ct):
    lim = rollout.Limits(max_turn_tokens=10, max_new_tokens=10)
    s = rollout.Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=3)
    a = rollout.rollout(model, ct, prompts_of(2), group_size=2, sampling=s, limits=lim, budget=BUDGET)
    b = rollout.rollout(model, ct, prompts_of(2), group_size=2, sampling=s, limits=lim, budget=BUDGET)
    assert [t.ids for t in a] == [t.ids for t in b]
    assert len({tuple(t.ids) for t in a}) > 1  # samples of one prompt differ


def test_rollout_builds_no_graph(model, ct):
    """Called with gradients on (the Python API, bench.py), the decode loop still keeps no autograd
    graph: one would hold every step's activations alive through the KV cache."""
    grad = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: grad.append(o.requires_grad))
    try:
        lim = rollout.Limits(max_turn_tokens=4, max_new_tokens=4)
        with torch.enable_grad():  # this file's fixture turns them off
            rollout.rollout(model, ct, prompts_of(1), sampling=rollout.Sampling(greedy=True), limits=lim, budget=BUDGET)
    finally:
        hook.remove()
    assert grad and not any(grad)


def tool(regions, query="look"):
    return {"region": [{"index": i, "bbox_2d": b} for i, b in regions], "query": query}


def run_steps(model, ct, turns, t_max=5, limits=rollout.Limits(), n_images=1):
    """Script raw assistant texts; returns the trajectory."""
    forced = []
    for k, text in enumerate(turns):
        forced += ct.encode(text) + ([] if text.rstrip().endswith("</tool>") else [ct.im_end])
    p = rollout.Prompt([noise_image(448, 336, 5 + i) for i in range(n_images)], "Q?", max_tool_calls=t_max)
    return rollout.rollout(Scripted(model, [forced]), ct, [p], limits=limits, budget=BUDGET)[0]


def call_text(call):
    return f"<think> look </think>\n<tool> {json.dumps(call)} </tool>"


ANSWER = "<think> done </think>\n<answer> 4 </answer>"


def test_t_max_reached(model, ct):
    c = call_text(tool([(0, [0, 0, 100, 100])]))
    traj = run_steps(model, ct, [c, c], t_max=1)
    assert traj.finish == "max_tool_calls" and traj.n_tool_calls == 2
    text = ct.decode(traj.ids)
    assert data.FINAL_NOTE in text and data.CONTINUE_NOTE not in text
    # with T_max = 2 the first observation invites more calls and the second says stop
    traj = run_steps(model, ct, [c, c, ANSWER], t_max=2)
    text = ct.decode(traj.ids)
    assert traj.finish == "answer" and text.index(data.CONTINUE_NOTE) < text.index(data.FINAL_NOTE)


def test_image_cap(model, ct):
    c = call_text(tool([(0, [0, 0, 100, 100]), (0, [50, 50, 150, 150])]))
    traj = run_steps(model, ct, [c, ANSWER], limits=rollout.Limits(max_images=2))
    assert traj.n_invalid == 1 and "too many images" in traj.errors[0]
    assert len(traj.context.views) == 1 and traj.finish == "answer"


def test_bad_json_gets_error_observation_and_continues(model, ct):
    traj = run_steps(model, ct, ['<think> x </think>\n<tool> {"region": [ </tool>', ANSWER])
    assert traj.n_invalid == 1 and traj.finish == "answer" and traj.answer == "4"
    assert "Error: " in ct.decode(traj.ids) and "JSON" in traj.errors[0].upper()


def test_box_out_of_bounds(model, ct):
    traj = run_steps(model, ct, [call_text(tool([(0, [0, 0, 5000, 100])])), ANSWER])
    assert traj.n_invalid == 1 and len(traj.context.views) == 1
    assert "Error: " + traj.errors[0] in ct.decode(traj.ids)


def test_finished_rows_leave_the_batch(model, ct, monkeypatch):
    batch_sizes = []
    real = ViLaVT.forward

    def spy(self, input_ids, *a, **kw):
        if input_ids.shape[1] == 1:
            batch_sizes.append(input_ids.shape[0])
        return real(self, input_ids, *a, **kw)

    monkeypatch.setattr(ViLaVT, "forward", spy)
    short, long = ct.encode(ANSWER) + [ct.im_end], ct.encode(ANSWER + " and some more words here") + [ct.im_end]
    ps = prompts_of(2)
    trajs = rollout.rollout(Scripted(model, [short, long]), ct, ps, budget=BUDGET)
    assert [t.finish for t in trajs] == ["answer", "answer"]
    assert batch_sizes[0] == 2 and batch_sizes[-1] == 1 and batch_sizes.count(2) == len(short)


def test_the_cache_grows_with_use(model, ct, monkeypatch):
    """The KV cache starts at the prompts plus a chunk and grows as rows need it (observations,
    decode steps), copying the written slots: the trajectories and every decode step's log-probs
    equal those of a cache allocated whole, and it never reaches max_context here."""
    from model import KVCache
    sizes, grow = [], KVCache.grow
    monkeypatch.setattr(KVCache, "grow", lambda self, max_len, n=None: sizes.append(max_len) or grow(self, max_len, n))
    prompt = rollout.Prompt([noise_image(448, 336, 1), noise_image(300, 300, 2)], TWO_CALLS["question"])
    lim = rollout.Limits(max_turn_tokens=24, max_new_tokens=48, max_context=4096)
    runs = {}
    for chunk in (8, 10**6):  # grown 8+ slots at a time, or allocated whole (max_context) at once
        monkeypatch.setattr(rollout, "CACHE_CHUNK", chunk)
        scripted = Scripted(model, [policy_tokens(ct, TWO_CALLS["steps"])])  # two observations
        free = Scripted(model)  # 3 prompts x 2 samples, greedy, rows finish at different steps
        runs[chunk] = (rollout.rollout(scripted, ct, [prompt], budget=BUDGET)[0], scripted,
                       rollout.rollout(free, ct, prompts_of(3), 2, rollout.Sampling(greedy=True), lim, BUDGET), free)
        if chunk == 8:
            assert len(sizes) >= 3 and max(sizes) < 4096, sizes
            sizes.clear()
    assert sizes == []  # allocated whole: never grown
    (a, sa, fa, ra), (b, sb, fb, rb) = runs[8], runs[10**6]
    assert a.ids == b.ids and torch.allclose(sa.logprobs(0, a), sb.logprobs(0, b), atol=1e-5)
    for r, (x, y) in enumerate(zip(fa, fb)):
        assert x.ids == y.ids and torch.allclose(ra.logprobs(r, x), rb.logprobs(r, y), atol=1e-5)


def test_an_observation_that_does_not_fit_ends_the_trajectory_cleanly(model, ct):
    """A valid tool call whose crops would overflow max_context ends the row (context_full)
    without them: the trajectory's images match its image tokens, so its log-probs can be
    recomputed (GRPO's old log-probs once raised "N image tokens but M features")."""
    call = call_text(tool([(0, [0, 0, 200, 150])]))
    p = rollout.Prompt([noise_image(448, 336, 5)], "Q?")
    probe = run_steps(model, ct, [call, ANSWER])  # how long prompt + call are
    fits = probe.ids.index(ct.im_end, probe.prompt_len) + 8  # room for the call, not for its crop's tokens
    traj = rollout.rollout(Scripted(model, [ct.encode(call) + ct.encode(ANSWER) + [ct.im_end]]), ct, [p],
                           limits=rollout.Limits(max_context=fits), budget=BUDGET)[0]
    assert traj.finish == "context_full" and traj.n_tool_calls == 1 and len(traj.context.views) == 1
    assert traj.context.queries == [""]
    ids = torch.tensor([traj.ids])
    h = model.hidden_states(ids, **traj.encoder_inputs(ct))  # images and image tokens agree
    assert h.shape[1] == len(traj.ids)
