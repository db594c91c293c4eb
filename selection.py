"""Selection rules: which response tokens of each rollout to train on.

Contract. A rule is a function `rule(stats, mask, keep, generator) -> (keep_mask, weights)`:
- `stats`: dict of (B, T) tensors over a padded batch of B rollouts, one row per rollout, built by
  quadrant_inputs.batch_statistics (the one builder: training, analysis, bench and the tests):
  `entropy_norm` (h_t = H / log V), `h_hat` and `d_hat` (the per-batch normalised axes),
  `reverse_kl` (δ_t), `forward_kl` (δ_fwd), `quadrant` (1..4, Table 1; 0 outside the mask), and
  `entropy`, `student_top1(_p)`, `teacher_top1(_p)`;
- `mask`: (B, T) bool, True at the response positions that may be trained on;
- `keep`: the keep ratio ρ in (0, 1]; the paper's rules keep exactly max(1, ⌊ρ·m⌋) of each
  rollout's m positions (the paper keeps ⌊ρ·m⌋; the floor of 1 is ours, so a short rollout trains);
- `generator`: a torch.Generator for the sampling rules, so a seed fixes the selection.
It returns a (B, T) bool keep mask, never True outside `mask` (`select` checks this and names the
rule that breaks it), and, for the sampling rules, (B, T) importance weights ∝ 1/p_t on the kept
positions (None for deterministic rules). A rule may keep any number of tokens, e.g. every token
above a threshold: distill.py divides the step's summed loss by the number of tokens actually kept
in the whole step, so a rule's count never acts as a hidden learning-rate change. A rule with
hyperparameters is registered with them bound, e.g. `functools.partial(select_d_hat_above,
threshold=0.7)` (below).

The importance weights are self-normalised to average 1 over each rollout's kept tokens (a ratio
estimator, on the scale of the plain mean); distill.py uses them only with --importance-weights
(the paper trains with a plain mean). Sampling without replacement uses Gumbel top-k, which draws
exactly the successive sampling design; its inclusion probabilities have no closed form, so p_t is
the standard πps approximation min(1, k·h_t / Σ h), with the cap redistributed.

Adding a rule is one function and one line in RULES (see the README). Definitions and the paper's
keep ratios: docs/method.md, "Selection rules".
"""
import functools

import torch

# ---------------------------------------------------------------------------------------------
# Shared mechanics: a per-rollout budget, a per-rollout top-k, and Gumbel top-k sampling.
# ---------------------------------------------------------------------------------------------


def budget(mask, keep):
    """Tokens to keep per rollout: max(1, ⌊keep·m⌋), 0 for an empty rollout. (B, T) -> (B,)."""
    m = mask.sum(-1)  # (B,)
    k = torch.floor(keep * m.double() + 1e-9).long().clamp_min(1)  # +1e-9: 0.3·10 is 2.9999…
    return torch.where(m > 0, torch.minimum(k, m), 0)


def top_k_per_rollout(score, mask, keep):
    """Keep the max(1, ⌊keep·m⌋) highest-scoring positions of each rollout; ties go to the earlier."""
    score = score.double().masked_fill(~mask, float("-inf"))  # (B, T)
    order = score.sort(dim=-1, descending=True, stable=True).indices  # (B, T)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)  # (B, T)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # (B, T): 0 = best in its row
    return (rank < budget(mask, keep)[:, None]) & mask  # (B, T)


def sample_per_rollout(prob, mask, keep, generator):
    """Draw max(1, ⌊keep·m⌋) positions per rollout without replacement, P(first pick) ∝ prob.

    Gumbel top-k: adding Gumbel noise to log-weights and keeping the top k is exactly sequential
    sampling without replacement. Zero-weight positions are drawn only if the positive ones run out.
    """
    u = torch.rand(prob.shape, generator=generator, dtype=torch.float64, device=generator.device)  # (B, T)
    u = u.to(prob.device).clamp(1e-300, 1.0)
    gumbel = -torch.log(-torch.log(u))  # (B, T)
    prob = prob.double()
    log_w = torch.where(prob > 0, prob.clamp_min(1e-300).log(), torch.full_like(prob, -1e6))
    kept = top_k_per_rollout(log_w + gumbel, mask, keep)  # (B, T)
    return kept, importance_weights(prob, mask, kept, keep)


def inclusion_probabilities(prob, mask, keep):
    """p_t ≈ min(1, k·w_t / Σ w) per rollout, the cap redistributed (the πps design). (B, T)."""
    k = budget(mask, keep).double()[:, None]  # (B, 1)
    w = torch.where(mask, prob.double().clamp_min(1e-12), 0.0)  # (B, T)
    capped = torch.zeros_like(mask)  # (B, T): positions already at p = 1
    for _ in range(mask.shape[-1]):  # give the capped mass back to the others until none exceeds 1
        free = mask & ~capped
        k_free = k - capped.sum(-1, keepdim=True)
        p = torch.where(capped, 1.0, k_free * w / (w * free).sum(-1, keepdim=True).clamp_min(1e-300))
        if not (free & (p > 1)).any():
            break
        capped = capped | (free & (p > 1))
    return torch.where(mask, p, 0.0)


def importance_weights(prob, mask, kept, keep):
    """1/p_t on kept positions, self-normalised to mean 1 per rollout.

    Self-normalising makes the weighted loss a ratio estimator of the rollout's mean divergence:
    slightly biased, but on the scale of the plain mean. The paper's unbiased form (1/m) Σ g_t/p_t
    (and its variance formula) is the same weights without the normalisation.
    """
    k = budget(mask, keep).double()[:, None]  # (B, 1)
    inv = torch.where(kept, 1.0 / inclusion_probabilities(prob, mask, keep).clamp_min(1e-12), 0.0)
    return (inv * k / inv.sum(-1, keepdim=True).clamp_min(1e-300)).float()  # (B, T)


# ---------------------------------------------------------------------------------------------
# The rules (definitions: docs/method.md, "Selection rules").
# ---------------------------------------------------------------------------------------------


def select_all(stats, mask, keep, generator):
    """all: every response token, the OPD baseline (keep is ignored)."""
    return mask.clone(), None


def select_random(stats, mask, keep, generator):
    """random [ours]: uniform without replacement; the paper has no random baseline."""
    return sample_per_rollout(mask.double(), mask, keep, generator)


def select_entropy(stats, mask, keep, generator):
    """entropy: sample without replacement with probability ∝ h_t (normalised entropy, Eq. 2)."""
    return sample_per_rollout(stats["entropy_norm"], mask, keep, generator)


def select_entropy_topk(stats, mask, keep, generator):
    """entropy-topk: the top-ρ tokens by ĥ (Soft-OR with δ̂ = 0)."""
    return top_k_per_rollout(stats["h_hat"], mask, keep), None


def soft_or_score(h_hat, d_hat):
    """s_t = ĥ + δ̂ - ĥ·δ̂ = 1 - (1 - ĥ)(1 - δ̂): high when either axis is high (Eqs. 7-9)."""
    return h_hat + d_hat - h_hat * d_hat


def select_soft_or(stats, mask, keep, generator):
    """soft-or (TIP): the top-ρ tokens by the Soft-OR score; parameter-free."""
    return top_k_per_rollout(soft_or_score(stats["h_hat"], stats["d_hat"]), mask, keep), None


def select_q3(stats, mask, keep, generator):
    """q3: the top-ρ tokens by δ_fwd·(1 - ĥ): confident (low ĥ) yet far from the teacher.

    Forward KL KL(P_T ‖ P_S) is only the detector; the loss on kept tokens stays as configured.
    """
    return top_k_per_rollout(stats["forward_kl"] * (1 - stats["h_hat"]), mask, keep), None


def select_divergence(stats, mask, keep, generator):
    """divergence: the top-ρ tokens by δ_t = KL(P_S ‖ P_T) alone (the div-only ablation)."""
    return top_k_per_rollout(stats["reverse_kl"], mask, keep), None


def select_soft_or_bottom(stats, mask, keep, generator):
    """soft-or-bottom: the *lowest* ρ by the Soft-OR score (sanity check: should do worst)."""
    return top_k_per_rollout(-soft_or_score(stats["h_hat"], stats["d_hat"]), mask, keep), None


def select_d_hat_above(stats, mask, keep, generator, threshold=0.7):
    """d-hat-above-0.7 [ours]: every token with δ̂ > threshold, whatever keep says; an example of a
    rule with a hyperparameter and a token count of its own (none kept in some rollouts)."""
    return (stats["d_hat"] > threshold) & mask, None


RULES = {
    "all": select_all,
    "random": select_random,
    "entropy": select_entropy,
    "entropy-topk": select_entropy_topk,
    "soft-or": select_soft_or,
    "q3": select_q3,
    "divergence": select_divergence,
    "soft-or-bottom": select_soft_or_bottom,
    "d-hat-above-0.7": functools.partial(select_d_hat_above, threshold=0.7),
}


class RuleContractError(ValueError):
    """A rule returned something other than a (B, T) bool mask inside the response mask."""


def get_rule(name):
    """The rule called `name`; a clear error listing the valid names otherwise."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(RULES)}")
    return RULES[name]


def check_keep(keep):
    """Raise unless 0 < keep ≤ 1."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")


def select(name, stats, mask, keep, generator=None):
    """Validate, then apply rule `name`: returns (keep_mask (B, T) bool, weights (B, T) or None)."""
    check_keep(keep)
    rule = get_rule(name)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    kept, weights = rule(stats, mask, keep, generator)
    if kept.dtype != torch.bool or kept.shape != mask.shape or (kept & ~mask).any():
        raise RuleContractError(
            f"rule {name!r} broke the rule contract (selection.py): it must return a "
            f"{tuple(mask.shape)} bool mask that is True only at response positions, got "
            f"{kept.dtype} {tuple(kept.shape)}" + (" with positions outside the response mask"
                                                  if kept.shape == mask.shape else ""))
    return kept, weights
