"""The one builder of a rule's input (selection.py's contract), from hidden states to quadrants.

    batch_statistics(...)   tip.token_stats at a mask's positions, then rule_inputs
    rule_inputs(...)        ĥ, δ̂, the quadrant and the thresholds over a whole batch, padded back
    followed_sums(...)      counts and sums over a group of marked positions (a task's followed tokens)

Math only, like tip.py: no model, file or process group inside. Under torchrun the normalisation
runs over every rank's positions, so N processes select what one process would: the caller passes
the gather (parallel.gather, which concatenates a 1-D tensor over ranks and says where this rank's
part starts); without one the batch is this process's own.

Notation as in tip.py: `B` rollouts, `T` padded positions, `N` = the mask's True positions, `D` hidden
size, `V` vocabulary.
"""
import torch

import tip


def _alone(values):
    """The gather of a single process: all values are its own, starting at 0."""
    return values, 0


def rule_inputs(flat, mask, h_threshold=None, d_threshold=None, return_thresholds=False, gather=None):
    """A rule's input from per-token statistics: `flat` is a dict of (N,) statistics at the N
    positions of the (B, T) mask, with at least `entropy`, `entropy_norm`, `reverse_kl` and
    `forward_kl`. Adds ĥ, δ̂ and the quadrant, normalised over the batch (every rank's positions
    when `gather` is parallel.gather), with the thresholds at the batch medians unless given, and
    pads everything back to (B, T). Returns stats, or (stats, (h_threshold, d_threshold))."""
    gather = gather or _alone
    h, offset = gather(flat["entropy"])  # (N_all,)
    d, _ = gather(flat["reverse_kl"])  # (N_all,)
    axes, thresholds = tip.normalized_axes(h, d, h_threshold, d_threshold)  # dict of (N_all,)
    mine = slice(offset, offset + flat["entropy"].numel())
    stats = tip.to_padded({**flat, **{k: v[mine] for k, v in axes.items()}}, mask)  # (B, T) each
    return (stats, thresholds) if return_thresholds else stats


def batch_statistics(student_hidden, student_head, teacher_hidden, teacher_head, mask, chunk_size,
                     gather=None, **thresholds):
    """tip.token_stats at the positions of `mask`, then rule_inputs: a dict of (B, T) tensors.

    Hidden states are (B, T, D), or already (N, D) at the mask's positions, and detached.
    `thresholds`: h_threshold, d_threshold, return_thresholds, as rule_inputs takes them.
    """
    flat_s = student_hidden[mask] if student_hidden.dim() == 3 else student_hidden  # (N, D_s)
    flat_t = teacher_hidden[mask] if teacher_hidden.dim() == 3 else teacher_hidden  # (N, D_t)
    flat = tip.token_stats(flat_s, student_head, flat_t, teacher_head, chunk_size)  # dict of (N,)
    return rule_inputs(flat, mask, gather=gather, **thresholds)


FOLLOWED = ("n", "kept", "q1", "q2", "q3", "q4", "h_hat", "d_hat", "reverse_kl")  # followed_sums' order


def followed_sums(stats, kept, marked):
    """Counts and sums over the `marked` positions (B, T): how many, how many kept, how many in
    each quadrant, Σ ĥ, Σ δ̂, Σ reverse KL (FOLLOWED's order) -> (9,) on the CPU."""
    quadrant = stats["quadrant"][marked]  # (n,)
    return torch.tensor([marked.sum().item(), (kept & marked).sum().item(),
                         *[(quadrant == q).sum().item() for q in range(1, 5)],
                         *[stats[k][marked].sum().item() for k in ("h_hat", "d_hat", "reverse_kl")]])
