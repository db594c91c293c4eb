"""Steps 2-6 of one optimizer step, over micro-batches: the teacher scores the student's rollouts,
the student scores them with gradients, per-token statistics, the rule's selection and the loss on
the kept positions only; the gradient of the step's mean over kept tokens is left in the student.

distill.py calls `opd_step` once per optimizer step; bench.py measures this very function, which is
why it sits in its own file below both. The notation is distill.py's: B rollouts, T padded
positions, V vocabulary, D hidden size, N the positions trained on, n the kept ones.
"""
import contextlib
from dataclasses import dataclass

import torch

import selection
import tip
import tracking
from loading import hidden_states, lm_head
from memory import phase
from parallel import all_reduce_sum, gather, world_size
from quadrant_inputs import FOLLOWED, batch_statistics, followed_sums
from rollouts import collate, micro_batches

@dataclass
class StepSettings:
    """What one optimizer step (opd_step, steps 2-6) reads, and nothing else."""
    rule: str  # selection.RULES
    keep: float  # keep ratio per rollout
    loss: str  # reverse_kl | forward_kl | jsd
    beta: float  # the JSD's mixture weight
    importance_weights: bool  # weight sampled tokens by 1/p
    chunk_size: int  # rows per lm_head projection
    micro_batch_size: int  # rollouts per forward/backward, at most
    micro_batch_tokens: int  # padded positions per forward/backward, at most
    dtype: torch.dtype  # the teacher's dtype and the student's autocast
    pad_id: int


# ---------------------------------------------------------------------------------------------
# 2-6. Teacher pass, student pass, statistics, selection and loss, over micro-batches
# ---------------------------------------------------------------------------------------------

def opd_step(student, teacher, rollouts, cfg, generator, times, tokens=None):
    """Teacher pass, student pass, statistics, selection and loss per micro-batch; leaves the
    gradient of (Σ loss over the step's kept tokens) / (their number) in the student. `cfg`: a
    StepSettings. Returns the step's token metrics (summed over ranks); fills `tokens` for the
    trackers. Token groups a task follows (rollouts.followed) get their own metrics."""
    device = next(student.parameters()).device
    autocast = (torch.autocast("cuda", dtype=cfg.dtype) if device.type == "cuda"
                and cfg.dtype != torch.float32 else contextlib.nullcontext())
    sums = dict.fromkeys(("loss", "entropy", "reverse_kl", "n", "kept", "padded", "real",
                          "h_threshold", "d_threshold"), 0.0)
    followed = {}  # group name -> followed_sums, summed over micro-batches
    quads = torch.zeros(2, 5)  # (2, 5) token counts per quadrant (0: not trained on): all, kept
    ws, wt = lm_head(student), lm_head(teacher)  # (V, D_s), (V, D_t)
    for part in micro_batches(rollouts, cfg.micro_batch_size, cfg.micro_batch_tokens):  # by length
        ids, attn, mask = (t.to(device) for t in collate(part.prompts, part.responses, cfg.pad_id,
                                                         part.masks, align=False))  # (b, T) each
        with phase(times, "teacher", device), torch.no_grad(), autocast:  # 2. frozen teacher
            h_t = hidden_states(teacher, ids, attn)  # (b, T, D_t)
        with phase(times, "student", device), autocast:  # 3. one forward, with gradients
            h_s = hidden_states(student, ids, attn)  # (b, T, D_s)
        with phase(times, "stats", device):  # 4. from the detached hidden states, fp32 logits
            stats, thresholds = batch_statistics(h_s.detach(), ws, h_t, wt, mask, cfg.chunk_size,
                                                 gather=gather, return_thresholds=True)  # (b, T) each
        with phase(times, "select", device):  # 5. positions to train on, per rollout
            kept, weights = selection.select(cfg.rule, stats, mask, cfg.keep, generator)  # (b, T)
        with phase(times, "loss", device):  # 6. lm_heads on kept positions only, chunked
            w = weights[kept] if (cfg.importance_weights and weights is not None) else None  # (n,)
            loss_sum = tip.chunked_divergence(h_s[kept], ws, h_t[kept], wt, cfg.loss, cfg.beta,
                                              cfg.chunk_size, w)  # () a sum over the n kept tokens
        with phase(times, "backward", device):
            # FSDP averages gradients over ranks, but each rank holds only a part of the step's
            # sum: scaling by the world size turns that average back into the sum.
            (loss_sum * world_size()).backward()
        for name, flags in (part.followed or {}).items():  # token groups a task follows
            marked = collate(part.prompts, part.responses, cfg.pad_id, flags, align=False)[2]  # (b, T)
            followed[name] = followed.get(name, 0) + followed_sums(stats, kept, mask & marked.to(device))
        sums["loss"] += loss_sum.item()
        sums["h_threshold"] += thresholds[0] * mask.sum().item()  # token-weighted over micro-batches
        sums["d_threshold"] += thresholds[1] * mask.sum().item()
        sums["entropy"] += stats["entropy"][mask].sum().item()
        sums["reverse_kl"] += stats["reverse_kl"][mask].sum().item()
        for key, count in (("n", mask.sum()), ("kept", kept.sum()), ("padded", attn.numel()),
                           ("real", attn.sum())):  # padded / real: the step's padding_ratio
            sums[key] += int(count)
        if tokens is not None:
            tokens.append(tracking.picture_tokens(stats, kept, mask))
        quads += torch.stack([torch.bincount(stats["quadrant"][m].cpu(), minlength=5)[:5]
                              for m in (mask, kept)])  # (2, 5)
    sums = {k: all_reduce_sum(v) for k, v in sums.items()}
    # The mean over the step's kept tokens, whatever number the rule kept: gradients are linear,
    # so dividing the accumulated sum once is exact and costs one pass over the gradients.
    n_kept = max(sums["kept"], 1)
    for p in student.parameters():
        if p.grad is not None:
            p.grad.div_(n_kept)
    quads = torch.tensor([[all_reduce_sum(q) for q in row] for row in quads.tolist()])  # (2, 5)
    n, lengths = max(sums["n"], 1), [len(r) for r in rollouts.responses]
    n_rollouts = max(all_reduce_sum(len(lengths)), 1)
    metrics = {"loss": sums["loss"] / n_kept, "entropy": sums["entropy"] / n,
               "reverse_kl": sums["reverse_kl"] / n, "kept_fraction": sums["kept"] / n,
               "response_tokens": int(sums["n"]), "kept_tokens": int(sums["kept"]),
               "padding_ratio": sums["padded"] / max(sums["real"], 1),
               "response_length": all_reduce_sum(sum(lengths)) / n_rollouts,
               "truncated_share": all_reduce_sum(sum(rollouts.truncated or [])) / n_rollouts}
    for q in range(1, 5):
        metrics[f"q{q}_share"] = (quads[0, q] / quads[0].sum().clamp_min(1)).item()
        metrics[f"q{q}_kept_share"] = (quads[1, q] / quads[1].sum().clamp_min(1)).item()
    metrics.update(h_threshold=sums["h_threshold"] / n, d_threshold=sums["d_threshold"] / n)
    for name, f in followed.items():  # each group's counts as shares, its sums as means
        f = dict(zip(FOLLOWED, (all_reduce_sum(v) for v in f.tolist())))
        m = max(f["n"], 1)
        metrics.update({f"{name}/n": int(f["n"]), **{f"{name}/{k}_share": f[k] / m for k in FOLLOWED[1:6]},
                        **{f"{name}/{k}": f[k] / m for k in FOLLOWED[6:]}})
    return metrics
