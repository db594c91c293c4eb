"""The contracts a fork relies on, checked where they are relied on: the rule input (one builder,
against an independent reference), rules that keep their own number of tokens, the output head,
data order streams, and peak memory without /proc."""
import builtins
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
import opd_step
import quadrant_inputs
import loading
import memory
import selection
from helpers import make_model, make_tokenizer
from loading import hidden_states, lm_head
from rollouts import collate, pad_id
from test_distill import _cfg, load_pair, naive_loss, pair, rollouts_for  # noqa: F401 (fixture)

# ---------------------------------------------------------------------------------------------
# The rule input: quadrant_inputs.batch_statistics against per-sequence, unpadded, full-logit float64 math
# ---------------------------------------------------------------------------------------------


def reference_statistics(student, teacher, rollouts):
    """Every response position's statistics from each rollout alone (no padding, no batching),
    through the models' own forward and full logits, in float64; the axes by their definitions."""
    rows = []
    for p, r in zip(rollouts.prompts, rollouts.responses):
        ids = torch.tensor([p + r])  # (1, L): one unpadded sequence
        with torch.no_grad():
            zs = student(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].double()  # (m, V)
            zt = teacher(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].double()
        zt = zt[:, :zs.shape[-1]]  # the common leading rows
        ps, pt = zs.softmax(-1), zt.softmax(-1)
        for t in range(len(r)):
            entropy = -(ps[t] * ps[t].log()).sum().item()
            rows.append({"entropy": entropy, "entropy_norm": entropy / math.log(zs.shape[-1]),
                         "reverse_kl": (ps[t] * (ps[t].log() - pt[t].log())).sum().item(),
                         "forward_kl": (pt[t] * (pt[t].log() - ps[t].log())).sum().item()})
    h = sorted(row["entropy"] for row in rows)
    cap = h[math.ceil(0.98 * len(h)) - 1]  # nearest-rank 98th percentile
    clipped = [min(row["entropy"], cap) for row in rows]
    d = [row["reverse_kl"] for row in rows]
    for row, hc in zip(rows, clipped):
        row["h_hat"] = (hc - min(clipped)) / (max(clipped) - min(clipped))
        row["d_hat"] = (row["reverse_kl"] - min(d)) / (max(d) - min(d))
    median = lambda xs: sorted(xs)[math.ceil(len(xs) / 2) - 1]  # noqa: E731 (the lower median)
    h_med, d_med = median([row["h_hat"] for row in rows]), median([row["d_hat"] for row in rows])
    for row in rows:
        high_h, high_d = row["h_hat"] > h_med, row["d_hat"] > d_med
        row["quadrant"] = (1 if high_d else 2) if high_h else (3 if high_d else 4)
    return rows


def test_batch_statistics_equal_an_independent_reference(pair):
    tok, teacher, student = load_pair(pair)  # the teacher's head has 5 extra rows
    rollouts = rollouts_for(tok, student, n_prompts=3, samples=2)
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, pad_id(tok))
    with torch.no_grad():
        stats = quadrant_inputs.batch_statistics(hidden_states(student, ids, attn), lm_head(student),
                                                 hidden_states(teacher, ids, attn), lm_head(teacher), mask, 3)
    ref = reference_statistics(student, teacher, rollouts)
    assert set(stats) >= {"entropy", "entropy_norm", "h_hat", "d_hat", "reverse_kl", "forward_kl",
                          "quadrant"}
    for key in ("entropy", "entropy_norm", "reverse_kl", "forward_kl", "h_hat", "d_hat"):
        got = stats[key][mask].double()  # row-major over the mask = rollout by rollout, in order
        want = torch.tensor([row[key] for row in ref], dtype=torch.float64)
        # ĥ and δ̂ divide by a narrow range (a random model's entropy is near log V): fp32 noise
        atol = 2e-3 if key in ("h_hat", "d_hat") else 1e-5
        assert torch.allclose(got, want, rtol=1e-4, atol=atol), key
    # a position within float noise of a median could flip: compare the clear-cut ones
    assert (stats["quadrant"][mask] == torch.tensor([row["quadrant"] for row in ref])).float().mean() > 0.95
    assert ((stats["quadrant"] > 0) == mask).all()


# ---------------------------------------------------------------------------------------------
# Rules that keep their own number of tokens; rules that break the contract
# ---------------------------------------------------------------------------------------------

def test_a_threshold_rule_trains_on_the_mean_of_what_it_keeps(pair):
    """d-hat-above-0.7 keeps a data-dependent count (not ⌊ρ·m⌋): the step's gradient must still be
    the gradient of the mean loss over exactly the kept tokens, across micro-batches."""
    tok, teacher, student = load_pair(pair)
    rollouts = rollouts_for(tok, student, n_prompts=3, samples=2)
    cfg = _cfg(tok, rule="d-hat-above-0.7", keep=0.5, micro_batch_size=6)
    metrics = opd_step.opd_step(student, teacher, rollouts, cfg, torch.Generator().manual_seed(0), {})
    grads = [p.grad.clone() for p in student.parameters()]
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, pad_id(tok))
    with torch.no_grad():
        stats = quadrant_inputs.batch_statistics(hidden_states(student, ids, attn), lm_head(student),
                                                 hidden_states(teacher, ids, attn), lm_head(teacher), mask, 512)
    kept = (stats["d_hat"] > 0.7) & mask
    budget = selection.budget(mask, 0.5).sum().item()
    assert 0 < kept.sum().item() != budget  # a count of its own, not the keep ratio's
    assert metrics["kept_tokens"] == kept.sum().item()
    student.zero_grad()
    ref, _ = naive_loss(student, teacher, rollouts, pad_id(tok), kept=kept)
    (ref / kept.sum()).backward()
    assert metrics["loss"] == pytest.approx(ref.item() / kept.sum().item(), rel=1e-5)
    for p, g in zip(student.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("broken,what", [
    (lambda stats, mask, keep, g: (torch.ones_like(mask), None), "outside the response mask"),
    (lambda stats, mask, keep, g: (mask.float(), None), "torch.float32"),
    (lambda stats, mask, keep, g: (mask[:, :-1], None), "bool mask")])
def test_a_rule_that_breaks_the_contract_is_named(monkeypatch, broken, what):
    monkeypatch.setitem(selection.RULES, "mine", broken)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    stats = {"h_hat": torch.rand(2, 3)}
    with pytest.raises(selection.RuleContractError, match="rule 'mine' broke the rule contract") as e:
        selection.select("mine", stats, mask, 0.5)
    assert what in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The output head: logits must be hidden @ Wᵀ
# ---------------------------------------------------------------------------------------------

def saved(tmp_path, change):
    tok = make_tokenizer()
    model = make_model(tok, 1, 32, seed=0)
    change(model)
    model.save_pretrained(tmp_path / "m")
    return loading.load_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)


def test_a_plain_head_passes(tmp_path):
    loading.check_output_head(saved(tmp_path, lambda m: None), "plain")


def test_a_head_with_a_bias_is_refused(tmp_path):
    model = saved(tmp_path, lambda m: None)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.weight.shape[0]))
    with pytest.raises(loading.UsageError, match="its lm_head has a bias"):
        loading.check_output_head(model, "biased")


def test_a_logit_transform_in_the_config_is_refused(tmp_path):
    model = saved(tmp_path, lambda m: setattr(m.config, "final_logit_softcapping", 30.0))
    with pytest.raises(loading.UsageError, match="final_logit_softcapping=30.0 transforms the logits"):
        loading.check_output_head(model, "capped")


def test_a_head_that_rescales_in_its_forward_is_caught_by_the_probe(tmp_path, monkeypatch):
    model = saved(tmp_path, lambda m: None)
    plain = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda h: plain(h) * 0.0625)  # a logit scale
    with pytest.raises(loading.UsageError, match="its logits differ from hidden @ lm_head.weight"):
        loading.check_output_head(model, "scaled")


# ---------------------------------------------------------------------------------------------
# Data order: every (seed, epoch) its own stream; resumable from the step alone
# ---------------------------------------------------------------------------------------------

def order(n, per_step, seed, steps):
    return [list(loading.prompt_order(n, s, per_step, seed)) for s in range(steps)]


def test_epochs_are_permutations_and_seeds_never_replay_each_other():
    n = 10
    seed0, seed1 = order(n, 5, 0, 4), order(n, 5, 1, 4)  # 2 epochs each
    for run in (seed0, seed1):
        assert sorted(run[0] + run[1]) == sorted(run[2] + run[3]) == list(range(n))
    assert seed0[2] + seed0[3] != seed1[0] + seed1[1]  # seed 0's 2nd epoch is not seed 1's 1st
    assert seed0[0] + seed0[1] != seed0[2] + seed0[3]  # a fresh permutation per epoch
    assert [list(loading.prompt_order(n, 3, 5, 0))] == order(n, 5, 0, 4)[3:]  # from the step alone


# ---------------------------------------------------------------------------------------------
# Peak memory on a CPU without /proc (macOS, Windows)
# ---------------------------------------------------------------------------------------------

def test_a_step_runs_and_reports_memory_without_proc(pair, tmp_path, monkeypatch):
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", no_proc)
    with pytest.raises(FileNotFoundError):
        memory._proc_status_bytes("VmHWM")
    cpu = torch.device("cpu")
    assert memory.start_memory_window(cpu) > 0 and memory.peak_memory(cpu) > 0  # getrusage
    out = tmp_path / "run"
    distill.main(["--teacher", pair["teacher"], "--student", pair["student"], "--dataset",
                  pair["data"], "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt",
                  "2", "--max-new-tokens", "6", "--output-dir", str(out)])
    record = json.loads(open(out / "metrics.jsonl").readline())
    assert record["step"] == 1 and record["peak_memory_bytes"] > 0


def test_windows_has_no_peak_but_still_runs(monkeypatch):
    monkeypatch.setattr(memory, "_proc_status_bytes", lambda field: (_ for _ in ()).throw(OSError()))
    monkeypatch.setitem(__import__("sys").modules, "resource", None)  # import resource fails
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: (_ for _ in ()).throw(OSError())
                        if str(p).startswith("/proc") else real_open(p, *a, **k))
    assert math.isnan(memory.start_memory_window(torch.device("cpu")))
    assert math.isnan(memory.peak_memory(torch.device("cpu")))


# ---------------------------------------------------------------------------------------------
# Freed memory kept for reuse (bench.py times the loss with it)
# ---------------------------------------------------------------------------------------------

KEPT_CALLS = """
import json, torch, memory, tip
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
rows, chunk, vocab = 320, 256, 40_000  # (2, 256, 40000) fp32 buffers: 82 MB, always mmapped
hs, ws = torch.randn(rows, 16, generator=g).requires_grad_(), torch.randn(vocab, 16, generator=g).requires_grad_()
ht, wt = torch.randn(rows, 24, generator=g), torch.randn(vocab, 24, generator=g)
def call():  # page faults of one forward + backward
    before = memory.minor_page_faults()
    tip.chunked_divergence(hs, ws, ht, wt, "jsd", 0.5, chunk).backward()
    hs.grad = ws.grad = None
    return memory.minor_page_faults() - before
def mmapped_by_a_new_block():  # did malloc mmap a tensor larger than all of its heap?
    before = memory._mallinfo2()
    x = torch.empty((before.arena >> 2) + (1 << 24))  # untouched: no memory is used
    return memory._mallinfo2().hblkhd - before.hblkhd >= x.numel() * 4
default = [call() for _ in range(3)]
with memory.keep_freed_memory() as kept:
    warm_up = [call() for _ in range(3)]
    steady = [call() for _ in range(4)]  # min: a later call can miss a merge again
    inside = mmapped_by_a_new_block()
print(json.dumps(dict(kept=kept, default=default[1:], steady=steady, inside=inside,
                 after=mmapped_by_a_new_block())))
"""


def test_freed_memory_is_kept_for_reuse_and_the_defaults_return():
    """In a fresh process (the allocator's settings are the process's): by default every call
    page-faults its 82 MB of buffers afresh; with freed memory kept, a repeated call reuses touched
    pages after a warm-up; after the block a large block is mmapped again."""
    out = json.loads(subprocess.run([sys.executable, "-c", KEPT_CALLS], capture_output=True,
                                    text=True, check=True, cwd=Path(__file__).parents[1]).stdout)
    if not out["kept"]:
        pytest.skip("no glibc mallopt here")
    assert min(out["default"]) > 15_000  # 82 MB / 4 KiB = 20,000 pages
    assert min(out["steady"]) < 1_000
    assert not out["inside"] and out["after"]  # a block larger than the heap: brk grows it; mmap
