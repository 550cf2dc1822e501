"""A scripted policy for tests (nanochat's MockModel idea): a real ViLaVT whose decode steps
emit given tokens. Prefills, observations, the KV cache and the vision encoder all run for
real, so a rollout under a script exercises everything but the sampler, and the production
loop (rollout.py) carries no test hook. The real model's log-probability distribution at every
decode step is recorded per row, to compare with a full forward or another batch layout."""

import torch


class Scripted:
    """Stands in for the model in rollout.rollout. scripts: per rollout row (b * G + g) the
    tokens to emit, or None to let the sampler choose (then only recording)."""

    def __init__(self, model, scripts=None):
        self.model = model
        self.scripts = None if scripts is None else [list(s) for s in scripts]
        self.rows = []  # cache row i holds rollout row self.rows[i]
        self.dists = {}  # rollout row -> [log-softmax over the vocabulary at each decode step]

    def __getattr__(self, name):  # everything but new_cache and the decode call is the model's own
        return getattr(self.model, name)

    def new_cache(self, batch, max_len):
        assert self.scripts is None or batch == len(self.scripts), f"{len(self.scripts)} scripts for {batch} rows"
        cache = self.model.new_cache(batch, max_len)
        self.rows, self.dists = list(range(batch)), {r: [] for r in range(batch)}
        select = cache.select_rows

        def select_rows(idx, n=None):  # finished rows leave the cache: follow which row is which
            self.rows = [self.rows[i] for i in idx.tolist()]
            return select(idx, n=n)

        cache.select_rows = select_rows
        return cache

    def __call__(self, input_ids, **kw):  # the rollout's batched decode step
        logits = self.model(input_ids, **kw)
        logp = logits[:, -1].float().log_softmax(-1)
        for i, r in enumerate(self.rows):
            self.dists[r].append(logp[i].clone())
        if self.scripts is None:
            return logits
        out = torch.full_like(logits, float("-inf"))
        for i, r in enumerate(self.rows):
            assert self.scripts[r], f"row {r}: the script ran out of tokens"
            out[i, -1, self.scripts[r].pop(0)] = 0.0
        return out

    def logprobs(self, row, traj):
        """The real model's log p of each policy token of row's trajectory, at its decode step."""
        toks = [t for t, m in zip(traj.ids, traj.policy_mask) if m]
        assert len(toks) == len(self.dists[row]), (len(toks), len(self.dists[row]))
        return torch.stack([d[t] for d, t in zip(self.dists[row], toks)])
