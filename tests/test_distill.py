"""distill.py: the chunked (fused) and gathered loss equals the naive one; masking; invariants;
CLI smoke runs; and a real learning signal on a tiny pair built here."""
import json
import os
import subprocess
import sys

import pytest
import torch

import opd_step
import quadrant_inputs
import loading
import selection
import tip
from bench import unfused_loss
from helpers import fp32_loss_tolerance, make_model, make_tokenizer, write_jsonl
from loading import hidden_states, lm_head
from rollouts import (Rollouts, collate, micro_batches, pad_id, padded_tokens, position_ids,
                      sample, stop_ids)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tokenizer, a teacher with a larger lm_head (Qwen2.5-style padding) and a smaller student,
    saved and reloaded through from_pretrained, plus a small prompts file."""
    root = tmp_path_factory.mktemp("pair")
    tok = make_tokenizer()
    for name, model in (("teacher", make_model(tok, 2, 48, seed=1, extra_rows=5)),
                        ("student", make_model(tok, 1, 32, seed=2))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_jsonl(root / "prompts.jsonl", [{"problem": f"What is {a} + {a + 3}?", "answer": str(2 * a + 3)}
                                         for a in range(12)])
    return {"dir": root, "teacher": str(root / "teacher"), "student": str(root / "student"),
            "data": str(root / "prompts.jsonl")}


def load_pair(pair):
    cpu = torch.device("cpu")
    tok = loading.load_tokenizer(pair["student"])
    teacher = loading.load_model(pair["teacher"], cpu, torch.float32).eval().requires_grad_(False)
    student = loading.load_model(pair["student"], cpu, torch.float32)
    return tok, teacher, student


def rollouts_for(tok, student, n_prompts=3, samples=2, max_new_tokens=12, seed=0):
    records = loading.load_records(os.path.join(os.path.dirname(tok.name_or_path), "prompts.jsonl"))
    prompts, _ = loading.encode_prompts(tok, records[:n_prompts], "problem", 1024)
    torch.manual_seed(seed)
    return sample(student, tok, prompts, samples, max_new_tokens)


def naive_loss(student, teacher, rollouts, pad, loss="reverse_kl", beta=0.5, kept=None, align=True):
    """Reference: full (B, L, V) logits from the models' own forward, then mask and sum."""
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, pad, align=align)
    pos = position_ids(attn)
    zs = student(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # (B, L, V_s)
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # (B, L, V_t)
    per_token = tip.divergence(loss, zs, zt[..., :zs.shape[-1]], beta)  # (B, L)
    use = mask if kept is None else kept
    return (per_token * use).sum(), mask


@pytest.mark.parametrize("loss,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("chunk_size,fused", [(1, True), (7, True), (10_000, True), (5, False)])
# fused: tip.chunked_divergence, distill.py's loss; not fused: bench.py's plain-autograd comparison
def test_selected_loss_equals_naive_values_and_gradients(pair, loss, beta, chunk_size, fused):
    tok, teacher, student = load_pair(pair)
    rollouts = rollouts_for(tok, student)
    ref, mask = naive_loss(student, teacher, rollouts, pad_id(tok), loss, beta)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, pad_id(tok))
    h_s = hidden_states(student, ids, attn)
    with torch.no_grad():
        h_t = hidden_states(teacher, ids, attn)
    loss_fn = tip.chunked_divergence if fused else unfused_loss
    got = loss_fn(h_s[mask], lm_head(student), h_t[mask], lm_head(teacher), loss, beta, chunk_size)
    got.backward()
    # fp32 against fp32: the naive JSD itself is off the float64 value by 4e-5 relative here
    tol = fp32_loss_tolerance(int(mask.sum()), lm_head(student).shape[0])
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=2 * tol)
    for p, g in zip(student.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("rule,keep", [("entropy", 0.5), ("soft-or", 0.2), ("q3", 0.1)])
def test_step_loss_on_selected_positions_equals_naive(pair, rule, keep):
    tok, teacher, student = load_pair(pair)
    rollouts = rollouts_for(tok, student)
    cfg = _cfg(tok, rule=rule, keep=keep, micro_batch_size=100, chunk_size=3)
    gen = torch.Generator().manual_seed(5)
    metrics = opd_step.opd_step(student, teacher, rollouts, cfg, gen, {})
    grads = [p.grad.clone() for p in student.parameters()]
    # reproduce the same selection by hand (one micro-batch, opd_step's layout), then the naive loss
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, cfg.pad_id, align=False)
    with torch.no_grad():
        stats = quadrant_inputs.batch_statistics(hidden_states(student, ids, attn),
                                                 lm_head(student), hidden_states(teacher, ids, attn),
                                                 lm_head(teacher), mask, 3)
    kept, _ = selection.select(rule, stats, mask, keep, torch.Generator().manual_seed(5))
    student.zero_grad()
    ref, _ = naive_loss(student, teacher, rollouts, cfg.pad_id, kept=kept, align=False)
    (ref / kept.sum()).backward()
    assert metrics["loss"] == pytest.approx(ref.item() / kept.sum().item(), rel=1e-5)
    assert metrics["kept_tokens"] == kept.sum().item()
    for p, g in zip(student.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


def _cfg(tok, **kw):
    base = dict(rule="all", keep=1.0, loss="reverse_kl", beta=0.5, importance_weights=False,
                micro_batch_size=100, micro_batch_tokens=10**6, chunk_size=512, dtype=torch.float32,
                pad_id=pad_id(tok))
    base.update(kw)
    return opd_step.StepSettings(**base)


def test_followed_token_groups_are_logged_where_they_sit(pair):
    """A task's followed tokens (the toy's carry): their quadrant shares, kept share and means are
    the hand count over the same statistics and selection; micro-batches keep them aligned."""
    tok, teacher, student = load_pair(pair)
    rollouts = rollouts_for(tok, student)
    rollouts.followed = {"g": [[int(i % 3 == 1) for i in range(len(r))] for r in rollouts.responses]}
    cfg = _cfg(tok, rule="entropy", keep=0.5)
    m = opd_step.opd_step(student, teacher, rollouts, cfg, torch.Generator().manual_seed(5), {})
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, cfg.pad_id, align=False)
    marked = collate(rollouts.prompts, rollouts.responses, cfg.pad_id, rollouts.followed["g"],
                     align=False)[2]
    with torch.no_grad():
        stats, thresholds = quadrant_inputs.batch_statistics(
            hidden_states(student, ids, attn), lm_head(student), hidden_states(teacher, ids, attn),
            lm_head(teacher), mask, 512, return_thresholds=True)
    kept, _ = selection.select("entropy", stats, mask, 0.5, torch.Generator().manual_seed(5))
    n = int(marked.sum())
    assert m["g/n"] == n == sum(map(sum, rollouts.followed["g"])) > 0
    assert m["g/kept_share"] == pytest.approx((kept & marked).sum().item() / n)
    for q in range(1, 5):
        assert m[f"g/q{q}_share"] == pytest.approx((stats["quadrant"][marked] == q).sum().item() / n)
    for key in ("h_hat", "d_hat", "reverse_kl"):
        assert m[f"g/{key}"] == pytest.approx(stats[key][marked].mean().item(), rel=1e-4)
    assert (m["h_threshold"], m["d_threshold"]) == pytest.approx(thresholds, rel=1e-4)
    one_each = opd_step.opd_step(student, teacher, rollouts, _cfg(tok, micro_batch_size=1),
                                torch.Generator().manual_seed(5), {})
    assert one_each["g/n"] == n and one_each["g/kept_share"] == 1.0  # rule "all" keeps every one


def test_micro_batching_does_not_change_the_gradient(pair):
    """By rollout count and by token budget (sorted by length, cut differently): the same update."""
    tok, teacher, student = load_pair(pair)
    rollouts = rollouts_for(tok, student, n_prompts=3, samples=2)
    lengths = sorted(len(p) + len(r) for p, r in zip(rollouts.prompts, rollouts.responses))
    assert lengths[0] < lengths[-1]  # rollouts of different lengths: sorting changes the cut
    grads, ratios = [], []
    for mbs, tokens in ((1, 10**6), (2, 10**6), (6, 10**6), (6, 2 * lengths[-1]), (6, 1)):
        student.zero_grad()
        metrics = opd_step.opd_step(student, teacher, rollouts, _cfg(tok, micro_batch_size=mbs,
                                   micro_batch_tokens=tokens), torch.Generator().manual_seed(0), {})
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        ratios.append(metrics["padding_ratio"])
    parts = [len(micro_batches(rollouts, 6, 2 * lengths[-1])), len(micro_batches(rollouts, 6, 1))]
    assert parts[1] == 6 and 1 < parts[0] < 6  # two cuts unlike each other and the count-based ones
    for g in grads[:-1]:
        assert torch.allclose(g, grads[-1], atol=1e-6, rtol=1e-4)
    assert ratios[-1] == 1.0 and ratios[2] == max(lengths) * 6 / sum(lengths)  # one per rollout: none


def test_micro_batches_by_token_budget_cut_padding_on_a_long_tailed_mix():
    g = torch.Generator().manual_seed(0)
    prompt = (60 * torch.exp(0.5 * torch.randn(8, generator=g))).long().clamp(5, 2048)  # (8,)
    response = (300 * torch.exp(torch.randn(128, generator=g))).long().clamp(1, 8192)  # (128,)
    rollouts = Rollouts(prompts=[[1] * int(prompt[i // 16]) for i in range(128)],
                        responses=[[2] * int(n) for n in response], masks=[[1] * int(n) for n in response])
    real = sum(len(p) + len(r) for p, r in zip(rollouts.prompts, rollouts.responses))
    budget = 4 * max(len(p) + len(r) for p, r in zip(rollouts.prompts, rollouts.responses))
    parts = micro_batches(rollouts, 64, budget)
    in_order = [padded_tokens(rollouts.prompts[i:i + 8], rollouts.responses[i:i + 8])
                for i in range(0, 128, 8)]  # the old cut: in rollout order, 8 at a time
    padded = [padded_tokens(p.prompts, p.responses) for p in parts]
    assert sum(padded) / real <= 1.1 < sum(in_order) / real
    assert len(parts) < 128 // 5  # similar lengths together: far fewer micro-batches than rollouts
    assert all(n <= budget for n in padded) and all(len(p.responses) <= 64 for p in parts)
    assert sorted(map(len, sum((p.responses for p in parts), []))) == sorted(map(len, rollouts.responses))
    assert all(len(m) == len(r) for p in parts for m, r in zip(p.masks, p.responses))
    assert padded_tokens(parts[0].prompts, parts[0].responses) == padded[0]


def test_micro_batches_match_the_busiest_rank(monkeypatch):
    """Under torchrun every rank runs as many micro-batches as the rank with the most."""
    import rollouts
    lengths = [9, 9, 8, 3, 2, 2, 1]
    step = Rollouts(prompts=[[1]] * 7, responses=[[2] * n for n in lengths])
    assert len(micro_batches(step, 7, 70)) == 1  # the whole step fits: one micro-batch
    monkeypatch.setattr(rollouts, "all_reduce_max", lambda n: 4)  # another rank cut 4
    parts = micro_batches(step, 7, 70)
    assert len(parts) == 4 and sorted(len(r) for p in parts for r in p.responses) == sorted(lengths)


def test_collate_unaligned_left_pads_whole_sequences():
    ids, attn, mask = collate([[5, 6, 7], [8]], [[10, 11, 2], [12]], pad=0, masks=[[1, 0, 1], [1]],
                              align=False)
    assert ids.tolist() == [[5, 6, 7, 10, 11, 2], [0, 0, 0, 0, 8, 12]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert mask.tolist() == [[False, False, True, False, True, False],
                             [False, False, False, False, True, False]]


def test_gradients_reach_the_student_only(pair):
    tok, teacher, student = load_pair(pair)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rollouts = rollouts_for(tok, student)
    opd_step.opd_step(student, teacher, rollouts, _cfg(tok), torch.Generator().manual_seed(0),
                     {})
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_student_equal_to_teacher_gives_zero_loss(pair):
    tok, _, student = load_pair(pair)
    twin = loading.load_model(pair["student"], torch.device("cpu"), torch.float32).eval().requires_grad_(False)
    rollouts = rollouts_for(tok, student)
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, pad_id(tok))
    with torch.no_grad():
        h = hidden_states(student, ids, attn)
        stats = quadrant_inputs.batch_statistics(h, lm_head(student), hidden_states(twin, ids, attn),
                                                 lm_head(twin), mask, 4)
    assert stats["reverse_kl"][mask].abs().max() < 1e-5
    metrics = opd_step.opd_step(student, twin, rollouts, _cfg(tok), torch.Generator().manual_seed(0),
                               {})
    assert abs(metrics["loss"]) < 1e-5 and abs(metrics["reverse_kl"]) < 1e-5


def test_collate_masks_only_response_tokens_up_to_eos():
    ids, attn, mask = collate([[5, 6, 7], [8]], [[10, 11, 2], [12]], pad=0)
    assert ids.tolist() == [[5, 6, 7, 10, 11, 2], [0, 0, 8, 12, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    # position i predicts token i+1: rows' loss positions are the ones before each response token
    assert mask.tolist() == [[False, False, True, True, True, False], [False, False, True, False, False, False]]


def test_sample_cuts_after_first_eos_and_positions_match_generate(pair):
    tok, _, student = load_pair(pair)
    records = loading.load_records(pair["data"])
    prompts, _ = loading.encode_prompts(tok, records[:4], "problem", 1024)
    rollouts = sample(student, tok, prompts, 1, 10, temperature=0.0, batch_size=4)
    eos = stop_ids(student, tok)
    for r in rollouts.responses:
        assert all(t not in eos for t in r[:-1])  # nothing after the first EOS
    # the training forward (explicit positions over left padding) reproduces generate's logits
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    attn = (torch.arange(P) >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    out = student.generate(input_ids=ids, attention_mask=attn, max_new_tokens=3, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = torch.cat([attn, torch.ones(len(prompts), 3, dtype=torch.long)], 1)
    with torch.no_grad():
        h = hidden_states(student, out.sequences, full)
    for j in range(3):
        logits = h[:, P - 1 + j] @ lm_head(student).T
        assert torch.allclose(logits, out.logits[j], atol=1e-4)


def test_post_eos_and_padding_never_change_the_loss(pair, monkeypatch):
    """Rows as generate returns them, with other tokens and padding after the first EOS, go through
    sample's cut and opd_step's collate and mask, in micro-batches padded differently (left: prompts
    of three lengths; right: responses of three lengths). The loss and its gradient equal a
    brute-force reference that runs each rollout alone, unpadded, up to its EOS, whatever follows
    the EOS and whatever the pad id; and again when the post-EOS tokens stay in the responses with
    mask 0 (the path an episode's tool answers take)."""
    tok, teacher, student = load_pair(pair)
    records = loading.load_records(pair["data"])
    prompts, _ = loading.encode_prompts(tok, [records[i] for i in (0, 7, 11)], "problem", 1024)
    assert len({len(p) for p in prompts}) == 3
    stops, width, gen = stop_ids(student, tok), 16, torch.Generator().manual_seed(0)

    def tokens(n):  # n random ids that are not a stop id
        ids = torch.randint(len(tok), (4 * n,), generator=gen).tolist()
        return [t for t in ids if t not in stops][:n]
    eos = tok.eos_token_id
    cut = [tokens(3) + [eos], tokens(9) + [eos], tokens(width)]  # the last one hit the length limit

    def rows(pad):  # what generate returns: `width` ids each, other tokens then pads after the EOS
        return [(r + tokens(4) + [pad] * width)[:width] for r in cut]

    def sampled(pad):
        by_prompt = {tuple(p): row for p, row in zip(prompts, rows(pad))}
        monkeypatch.setattr("rollouts.generate", lambda model, batch, config, pad_: [
            by_prompt[tuple(p)] for p in batch])
        return sample(student, tok, prompts, 1, width, batch_size=3)

    losses = []  # the reference: each rollout alone, no padding, its response cut after the EOS
    for p, r in zip(prompts, cut):
        ids = torch.tensor([p + r])  # (1, len(p) + len(r))
        zs = student(input_ids=ids).logits[0, len(p) - 1:-1]  # (len(r), V_s): predicts each of r
        with torch.no_grad():
            zt = teacher(input_ids=ids).logits[0, len(p) - 1:-1, :zs.shape[-1]]  # (len(r), V_s)
        losses.append(tip.reverse_kl(zs, zt).sum())
    n = sum(len(r) for r in cut)
    student.zero_grad()
    ref = torch.stack(losses).sum() / n
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]

    cfg = _cfg(tok, micro_batch_size=2)  # micro-batches of 2 and 1 rollouts
    first = sampled(pad_id(tok))
    uncut = rows(pad_id(tok))
    masked = type(first)(prompts=first.prompts, responses=uncut,
                         masks=[[1] * len(r) + [0] * (width - len(r)) for r in cut])
    for rollouts, pad in ((first, pad_id(tok)), (sampled(pad_id(tok)), 7), (masked, pad_id(tok))):
        if rollouts is not masked:
            assert rollouts.responses == cut  # nothing after the first EOS reaches collate
        student.zero_grad()
        cfg.pad_id = pad  # a different pad token: padding must be invisible
        metrics = opd_step.opd_step(student, teacher, rollouts, cfg, torch.Generator().manual_seed(0), {})
        assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)
        assert metrics["response_tokens"] == metrics["kept_tokens"] == n
        for p, g in zip(student.parameters(), ref_grads):
            assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "distill.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("rule", ["all", "entropy", "soft-or"])
def test_cli_smoke_writes_metrics_and_a_loadable_checkpoint(pair, tmp_path, rule):
    out = tmp_path / "run"
    r = run_cli("--teacher", pair["teacher"], "--student", pair["student"], "--dataset", pair["data"],
                "--rule", rule, "--keep", "0.5", "--steps", "2", "--prompts-per-step", "2",
                "--samples-per-prompt", "2", "--max-new-tokens", "8", "--micro-batch-size", "2",
                "--lr", "1e-3", "--output-dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [rec["step"] for rec in records] == [1, 2]
    for key in ("loss", "entropy", "reverse_kl", "kept_fraction", "q1_share", "q3_kept_share",
                "response_length", "tokens_per_s", "peak_memory_bytes", "time/sample", "time/loss"):
        assert key in records[0], key
    if rule == "all":
        assert records[0]["kept_fraction"] == 1.0
    else:
        assert 0 < records[0]["kept_fraction"] < 1
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-000002")
    assert model.config.vocab_size == loading.load_model(pair["student"], torch.device("cpu"),
                                                         torch.float32).config.vocab_size
    assert "step    2/2 | loss" in r.stdout


def test_twenty_steps_lower_the_reverse_kl_on_fresh_rollouts(pair):
    tok, teacher, student = load_pair(pair)
    records = loading.load_records(pair["data"])
    prompts, _ = loading.encode_prompts(tok, records, "problem", 1024)
    held_in, fresh = prompts[:8], prompts[8:]

    def fresh_kl():
        torch.manual_seed(123)
        r = sample(student, tok, fresh, 4, 10)
        ids, attn, mask = collate(r.prompts, r.responses, pad_id(tok))
        with torch.no_grad():
            s = quadrant_inputs.batch_statistics(hidden_states(student, ids, attn), lm_head(student),
                                                 hidden_states(teacher, ids, attn), lm_head(teacher), mask, 512)
        return s["reverse_kl"][mask].mean().item()

    before = fresh_kl()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for step in range(20):
        torch.manual_seed(step)
        r = sample(student, tok, held_in, 2, 10)
        opd_step.opd_step(student, teacher, r, _cfg(tok), torch.Generator().manual_seed(step),
                         {})
        opt.step()
        opt.zero_grad()
    after = fresh_kl()
    assert after < 0.7 * before, (before, after)
