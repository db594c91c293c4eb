"""Selection rules: exact per-rollout counts, masks respected, determinism, and each rule's ranking."""
import math

import pytest
import torch

import quadrant_inputs
import selection


def make_batch(seed=0, b=5, t=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([40, 17, 3, 1, 29])[:b]
    start = torch.tensor([0, 5, 10, 2, 11])[:b]
    pos = torch.arange(t)
    mask = (pos >= start[:, None]) & (pos < (start + lengths)[:, None])  # (B, T)
    entropy = torch.rand(b, t, generator=g) * 3
    flat = {"entropy": entropy[mask], "entropy_norm": entropy[mask] / math.log(100),
            "reverse_kl": (torch.rand(b, t, generator=g) ** 3)[mask],
            "forward_kl": (torch.rand(b, t, generator=g) ** 3)[mask]}
    return quadrant_inputs.rule_inputs(flat, mask), mask  # the rule input, as training builds it


PAPER_RULES = [r for r in selection.RULES if r != "d-hat-above-0.7"]  # the ⌊ρ·m⌋ rules


@pytest.mark.parametrize("rule", list(selection.RULES))
def test_every_rule_accepts_the_full_rule_input(rule):
    """Each registered rule runs on the builder's dict (quadrant included) within the mask."""
    stats, mask = make_batch()
    assert {"entropy_norm", "h_hat", "d_hat", "reverse_kl", "forward_kl", "quadrant"} <= set(stats)
    kept, _ = selection.select(rule, stats, mask, 0.5, torch.Generator().manual_seed(1))
    assert kept.shape == mask.shape and not (kept & ~mask).any()


def test_the_threshold_rule_keeps_exactly_the_tokens_above_it():
    stats, mask = make_batch()
    kept, _ = selection.select("d-hat-above-0.7", stats, mask, 0.5)
    assert torch.equal(kept, (stats["d_hat"] > 0.7) & mask) and 0 < kept.sum() < mask.sum()


@pytest.mark.parametrize("rule", PAPER_RULES)
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3, 0.2, 0.1, 0.01])
def test_exact_count_per_rollout_and_never_outside_mask(rule, keep):
    stats, mask = make_batch()
    kept, weights = selection.select(rule, stats, mask, keep, torch.Generator().manual_seed(1))
    m = mask.sum(-1)
    expected = m if rule == "all" else torch.clamp(torch.floor(keep * m + 1e-9), min=1).long()
    assert kept.sum(-1).tolist() == expected.tolist()
    assert not (kept & ~mask).any()
    if weights is not None:
        assert (weights[~kept] == 0).all()
        assert weights.sum(-1).allclose(kept.sum(-1).float())  # mean 1 over each rollout's kept


def test_budget_floor_is_exact_despite_float_error():
    mask = torch.ones(3, 100, dtype=torch.bool)
    mask[1, 10:] = False
    mask[2, 30:] = False
    assert selection.budget(mask, 0.29).tolist() == [29, 2, 8]  # 0.29·100 = 28.999… in floats
    assert selection.budget(mask[:, :0], 0.5).tolist() == [0, 0, 0]


@pytest.mark.parametrize("rule", ["random", "entropy"])
def test_sampling_is_deterministic_for_a_fixed_generator(rule):
    stats, mask = make_batch()
    a, _ = selection.select(rule, stats, mask, 0.3, torch.Generator().manual_seed(7))
    b, _ = selection.select(rule, stats, mask, 0.3, torch.Generator().manual_seed(7))
    c, _ = selection.select(rule, stats, mask, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _row_never_prefers_lower(score, kept, mask):
    for s, k, m in zip(score, kept, mask):
        if k.any() and (m & ~k).any():
            assert s[k].min() >= s[m & ~k].max()


def test_topk_rules_rank_by_their_definition():
    stats, mask = make_batch()
    soft_or = stats["h_hat"] + stats["d_hat"] - stats["h_hat"] * stats["d_hat"]
    scores = {"entropy-topk": stats["h_hat"], "soft-or": soft_or,
              "q3": stats["forward_kl"] * (1 - stats["h_hat"]), "divergence": stats["reverse_kl"],
              "soft-or-bottom": -soft_or}
    for rule, score in scores.items():
        kept, weights = selection.select(rule, stats, mask, 0.3)
        assert weights is None
        _row_never_prefers_lower(score, kept, mask)


def test_q3_prefers_confident_wrong_token_over_uncertain_one():
    mask = torch.ones(1, 2, dtype=torch.bool)
    stats = {"h_hat": torch.tensor([[0.05, 0.95]]), "forward_kl": torch.tensor([[2.0, 2.5]])}
    kept, _ = selection.select("q3", stats, mask, 0.5)
    assert kept.tolist() == [[True, False]]


def test_soft_or_keeps_q3_that_entropy_topk_drops():
    # token 0: Q3 (low h, high δ); token 1: Q2 (mid h, low δ); token 2: Q4; token 3: Q4
    h_hat, d_hat = torch.tensor([[0.0, 0.6, 0.1, 0.05]]), torch.tensor([[1.0, 0.0, 0.0, 0.02]])
    stats, mask = {"h_hat": h_hat, "d_hat": d_hat}, torch.ones(1, 4, dtype=torch.bool)
    assert selection.select("soft-or", stats, mask, 0.25)[0].tolist() == [[True, False, False, False]]
    assert selection.select("entropy-topk", stats, mask, 0.25)[0].tolist() == [[False, True, False, False]]


def test_entropy_sampling_frequencies_track_h():
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    draws = 4000
    for _ in range(draws):  # keep 0.2 of 5 = 1 token: a single draw ∝ h
        kept, _ = selection.select("entropy", {"entropy_norm": h}, mask, 0.2, g)
        counts += kept[0].float()
    freq = counts / draws
    assert freq.allclose(h[0] / h.sum(), atol=0.025)
    assert counts[-1] == 0  # zero entropy is never drawn while positive weight remains


def test_importance_weights_are_inverse_inclusion_probability():
    h = torch.tensor([[0.1, 0.3, 0.6, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    kept = torch.tensor([[True, True, False, False]])
    w = selection.importance_weights(h, mask, kept, keep=0.34)  # k = 1: p = h / Σh
    inv = torch.tensor([1 / 0.1, 1 / 0.3])
    assert w[0, :2].allclose(inv / inv.sum())
    # k = 2 of weights (0.1, 0.3, 0.6): p = (0.2, 0.6, 1.2) -> cap 0.6 at 1, rest share k - 1 = 1
    w2 = selection.importance_weights(h, mask, torch.tensor([[True, False, True, False]]), keep=0.67)
    inv2 = torch.tensor([1 / 0.25, 1 / 1.0])
    assert w2[0, [0, 2]].allclose(2 * inv2 / inv2.sum())


def test_bad_input_is_refused_clearly():
    stats, mask = make_batch()
    with pytest.raises(ValueError, match="valid rules: all, random, entropy"):
        selection.select("entropi", stats, mask, 0.5)
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
            selection.select("entropy", stats, mask, keep)


def test_inclusion_probabilities_sum_to_the_budget_and_cap_at_one():
    prob = torch.tensor([[0.1, 0.3, 0.6, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    p = selection.inclusion_probabilities(prob, mask, keep=0.67)  # k = 2 and 2
    assert p[0].tolist() == pytest.approx([0.25, 0.75, 1.0, 0.0])
    assert p[1].tolist() == pytest.approx([0.5] * 4)
    assert p.sum(-1).tolist() == pytest.approx([2.0, 2.0])
