"""
GRPO for ViLaVT (paper section 3.4, Eq. 5-6): clip 0.2/0.3, no KL term, no reference model.
"""

import torch


# -----------------------------------------------------------------------------
# the objective (paper Eq. 6)


def group_advantages(rewards, group_size, eps=1e-6):
    """A(tau) = (R - mean_group) / (std_group + eps) over consecutive groups of G rollouts of
    one prompt. std is unbiased (N-1), as in the release. A group whose rewards are all equal
    gets A = 0 (0 / eps), never NaN. rewards: (N,) -> (N,)."""
    assert group_size >= 2, "GRPO needs at least 2 rollouts per prompt (the unbiased std of 1 is undefined)"
    assert rewards.numel() % group_size == 0, f"{rewards.numel()} rewards are not groups of {group_size}"
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=None,
                aggregation="token-mean", normalizer=None):
    """Eq. 6 per token: -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A), rho = exp(logp - logp_old).

    logp, old_logp, mask: (B, T); adv: (B,), broadcast to every token of its trajectory.
    dual_clip (release: 3.0): for A < 0 the loss is also capped at -dual_clip*A, so a huge
    ratio on a bad trajectory cannot blow up the update.
    aggregation: "token-mean" (default: mean over all masked tokens) or "seq-mean" (mean over
    trajectories of each one's token mean, the release's option). normalizer: divide by this
    instead of the local count (the global token or trajectory count when the batch is split
    over ranks and micro-batches, so every split gives the same gradient)."""
    mask = mask.to(logp.dtype)
    a = adv[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -a * dual_clip), loss)
    if aggregation == "token-mean":
        total = (loss * mask).sum()
        return total / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    if aggregation == "seq-mean":
        per_seq = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / (normalizer if normalizer is not None else logp.shape[0])
    raise ValueError(f"unknown aggregation {aggregation!r} (token-mean or seq-mean)")
