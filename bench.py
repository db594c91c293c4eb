"""What each memory technique buys: peak memory and time of one training step per configuration.

    python bench.py                          # tiny Qwen3-shaped pair, real vocabulary, CPU
    python bench.py --quick                  # seconds; what tests/test_bench.py runs
    python bench.py --preset qwen3-4b-0.6b   # Qwen3-4B / Qwen3-0.6B shapes, random weights, GPU
    python bench.py --json bench.json --plot bench.png

A step is distill.py's steps 2-7 (teacher pass, statistics, selection, loss, backward, AdamW step)
on B synthetic rollouts of fixed random token ids, the same in every configuration. Four ways to
get the loss, each at keep 1.0 (rule `all`) and 0.5 / 0.2 / 0.1 (rule `--rule`):
    naive     for comparison only, and only here: the way most public code does it. The models' own
              forward returns full (B, L, V) logits; statistics and the per-token loss are computed
              over all of them, and the selection only masks the loss at the end.
    gathered  distill.py's pieces: hidden states, statistics chunk by chunk, `lm_head` only at the
              N kept positions, but in one chunk whose (N, V) logits stay alive until backward.
    recompute `--chunk-size` kept rows at a time, each chunk under activation checkpointing: its
              logits are rebuilt in backward (both models' projections run twice).
    chunked   the real path, `opd_step.opd_step`: `--chunk-size` kept rows at a time, each
              chunk's logits built once and turned into the gradient in the forward
              (tip.chunked_divergence). Also run with activation checkpointing of the student.

Each configuration runs in a fresh process (a child of a forkserver that imported torch once and
never ran a torch op), so no allocation of one configuration counts in the next one's peak.
Memory is the peak over the measured steps (the warm-up step also allocates AdamW's state):
    GPU   torch.cuda.max_memory_allocated: weights, optimizer state, activations, logits.
    CPU   peak RSS (VmHWM, reset before each step via /proc/self/clear_refs). It includes Python,
          the torch libraries and the weights, so the table also gives the "step peak": the peak
          minus the RSS just before the step, i.e. what the step itself adds.
Step time is the median of the measured steps. Ratios are to the naive all-token step. The run
ends by saying whether three targets are met: memory of chunked keep 0.5 ≤ 0.50× naive (the paper
reports 0.53× for Qwen3) and of chunked keep 1.0 ≤ 0.35×, time of chunked keep 0.5 ≤ 0.8× keep 1.0.

Choices: the naive path projects the prompt positions too, as a model's own forward does; rollouts
all have the same length, so no padding; one micro-batch holds all B rollouts. CPU memory comes
from memory.py (Linux's /proc, resettable per step). On a CPU shared with other work, time ratios
are noisy and `--threads 1` often runs faster than more threads that wait on each other.

Precision: every path projects logits in fp32 (tip.project). The run ends with what that costs
against a bf16 projection under autocast, for one chunk of the teacher's rows (docs/method.md,
"Precision").

Notation: B rollouts, L = prompt + response positions, V vocabulary, D hidden size, N kept rows.
"""
import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import torch

import opd_step
import loading
import selection
import tip
from loading import hidden_states, lm_head
from memory import HeapPeak, keep_freed_memory, minor_page_faults, peak_memory, start_memory_window
from quadrant_inputs import batch_statistics, rule_inputs
from rollouts import Rollouts, collate, micro_batches, padded_tokens, position_ids

# head_dim is explicit: Qwen3 decouples it from hidden / heads (Qwen3-4B: 2560 / 32 = 80, yet 128).
PRESETS = {
    "tiny": dict(  # the CPU default: backbones so small that the (·, V) logits dominate memory
        teacher=dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32),
        student=dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16),
        vocab=151_936, batch=8, prompt_length=32, response_length=256, chunk_size=512),
    "quick": dict(  # seconds, for the test; one thread, as tiny ops on a busy CPU wait on barriers
        teacher=dict(hidden=48, layers=2, heads=4, kv_heads=2, head_dim=8),
        student=dict(hidden=32, layers=1, heads=4, kv_heads=2, head_dim=8),
        vocab=512, batch=2, prompt_length=4, response_length=16, chunk_size=8, steps=2, threads=1,
        head=dict(student_hidden=32, teacher_hidden=48, vocab=512, rows=16, chunk_size=8, repeats=1)),
    "qwen3-4b-0.6b": dict(  # each model's config.json; random weights, no download; for a GPU
        teacher=dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728),
        student=dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072),
        vocab=151_936, batch=8, prompt_length=128, response_length=1024, chunk_size=512),
}
PATHS = ("naive", "gathered", "recompute", "chunked")
# The loss alone at Qwen3-4B -> Qwen3-0.6B head shapes (their config.json): 512 kept rows, chunks of
# 256, against the four matrix products any chunked loss must do (the "GEMM floor").
QWEN3_HEADS = dict(student_hidden=1024, teacher_hidden=2560, vocab=151_936, rows=512, chunk_size=256,
                   repeats=7)
# Length mixes for the padding ratio, (prompts, rollouts per prompt, prompt and response lengths):
#   math: 8 prompts x 16 rollouts (the paper's step); prompt log-normal, median 150 tokens, sigma
#     0.5, in [20, 2048]; response log-normal, median 1,200, sigma 1.0, capped at 8,192 (MATH
#     rollouts run from a few hundred tokens to the cap).
#   deepplanning: 8 tasks x 4 episodes; prompt 5,887 tokens (the rendered English prompt, README);
#     the rest log-normal, median 19,000, sigma 0.5, the whole capped at 40,960 (the ten recorded
#     MiniMax-M2.5 episodes: ~25k tokens median, 41.0k the longest; README).
LENGTH_MIXES = {"math": dict(prompts=8, per_prompt=16, prompt=(150, 0.5, 20, 2048),
                             response=(1200, 1.0, 1, 8192), total_cap=None),
                "deepplanning": dict(prompts=8, per_prompt=4, prompt=(5887, 0.0, 5887, 5887),
                                     response=(19000, 0.5, 1, 40960), total_cap=40960)}


# ---------------------------------------------------------------------------------------------
# Models and rollouts, rebuilt identically in every process from the seed
# ---------------------------------------------------------------------------------------------

def build_model(shape, vocab, seed, device, dtype):
    """A randomly initialised Qwen3ForCausalLM with tied embeddings, as small Qwen3 models have."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=vocab, hidden_size=shape["hidden"],
                         intermediate_size=shape.get("intermediate", 3 * shape["hidden"]),
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                         tie_word_embeddings=True, max_position_embeddings=32_768,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 4B model is slow to init on a CPU
        return Qwen3ForCausalLM(config).to(dtype)


def make_rollouts(batch, prompt_length, response_length, vocab, seed):
    """B rollouts of random ids ≥ 1 (0 is the pad id), all of one length: no generation needed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt_length + response_length), generator=g)  # (B, L)
    return Rollouts(prompts=ids[:, :prompt_length].tolist(),
                            responses=ids[:, prompt_length:].tolist())


# ---------------------------------------------------------------------------------------------
# Four ways to do steps 2-6. Each returns (loss per kept token, kept tokens), gradients filled.
# ---------------------------------------------------------------------------------------------

def _batch(student, rollouts, cfg):
    device = next(student.parameters()).device
    autocast = (torch.autocast("cuda", dtype=cfg.dtype) if device.type == "cuda"
                and cfg.dtype != torch.float32 else nullcontext())  # as in opd_step.opd_step
    return autocast, [t.to(device) for t in collate(rollouts.prompts, rollouts.responses,
                                                             cfg.pad_id)]


def naive_forward_backward(student, teacher, rollouts, cfg, generator):
    """NAIVE, for comparison only: full (B, L, V) logits, statistics and loss at every position,
    then the mask. Memory grows with B·L·V whatever the keep ratio: masking comes too late."""
    autocast, (ids, attn, mask) = _batch(student, rollouts, cfg)
    pos = position_ids(attn)  # (B, L)
    with torch.no_grad(), autocast:
        zt = teacher(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    with autocast:
        zs = student(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    vocab = min(zs.shape[-1], zt.shape[-1])
    zs, zt = zs[..., :vocab], zt[..., :vocab]  # (B, L, V) each; the student's carries gradients
    with torch.no_grad():  # statistics straight from the full logits, at the response positions
        flat = {"entropy": tip.entropy(zs[mask]), "reverse_kl": tip.reverse_kl(zs[mask], zt[mask]),
                "forward_kl": tip.forward_kl(zs[mask], zt[mask])}  # (N,) each
    flat["entropy_norm"] = flat["entropy"] / math.log(vocab)  # Eq. 2
    stats = rule_inputs(flat, mask)  # (B, L) each: the rule's input, as in training
    kept, _ = selection.select(cfg.rule, stats, mask, cfg.keep, generator)  # (B, L) bool
    per_token = tip.divergence(cfg.loss, zs, zt, cfg.beta)  # (B, L) fp32, Eq. 1 everywhere
    n_kept = max(int(kept.sum()), 1)
    loss = (per_token * kept).sum() / n_kept  # only here do the unselected positions drop out
    loss.backward()
    return loss.item(), n_kept


def _kept_rows_forward_backward(student, teacher, rollouts, cfg, generator, loss_of_kept_rows):
    """opd_step.opd_step for one micro-batch, with the loss on the kept rows taken by the given
    function (hidden states, heads) -> summed loss."""
    autocast, (ids, attn, mask) = _batch(student, rollouts, cfg)
    ws, wt = lm_head(student), lm_head(teacher)  # (V, D_s), (V, D_t)
    with torch.no_grad(), autocast:
        h_t = hidden_states(teacher, ids, attn)  # (B, L, D_t)
    with autocast:
        h_s = hidden_states(student, ids, attn)  # (B, L, D_s)
        stats = batch_statistics(h_s.detach(), ws, h_t, wt, mask, cfg.chunk_size)
    kept, _ = selection.select(cfg.rule, stats, mask, cfg.keep, generator)  # (B, L) bool
    n_kept = max(int(kept.sum()), 1)
    with autocast:
        loss_sum = loss_of_kept_rows(h_s[kept], ws, h_t[kept], wt)  # (,)
    (loss_sum / n_kept).backward()
    return loss_sum.item() / n_kept, n_kept


def unfused_loss(student_hidden, student_head, teacher_hidden, teacher_head, loss, beta,
                 chunk_size):
    """Σ_t D(P_S, P_T) over the N given rows with plain autograd, for comparison only: every
    chunk's (chunk, V) logits stay alive until backward. distill.py uses tip.chunked_divergence."""
    vocab = min(student_head.shape[0], teacher_head.shape[0])  # common leading rows
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, student_hidden.shape[0], chunk_size):
        zs = tip.project(student_hidden[i:i + chunk_size], student_head[:vocab])  # (n, V), grad
        with torch.no_grad():
            zt = tip.project(teacher_hidden[i:i + chunk_size], teacher_head[:vocab])  # (n, V)
        total = total + tip.divergence(loss, zs, zt, beta).sum()  # (n,) fp32, Eq. 1
    return total


def gathered_forward_backward(student, teacher, rollouts, cfg, generator):
    """The kept rows go through `lm_head` in one chunk, plain autograd: their (N, V) logits live
    until backward."""
    return _kept_rows_forward_backward(student, teacher, rollouts, cfg, generator, lambda hs, ws, ht, wt:
                                       unfused_loss(hs, ws, ht, wt, cfg.loss, cfg.beta,
                                                    chunk_size=hs.shape[0]))


def recompute_forward_backward(student, teacher, rollouts, cfg, generator):
    """`--chunk-size` kept rows at a time under activation checkpointing: the forward keeps only
    each chunk's inputs, and backward projects the chunk again (both models) to rebuild its
    logits. Bounded memory like `chunked`, at the price of a second pass over the vocabulary."""
    from torch.utils.checkpoint import checkpoint

    def loss(hs, ws, ht, wt):  # the plain (unfused) loss, one checkpointed call per chunk
        return sum(checkpoint(unfused_loss, hs[i:i + cfg.chunk_size], ws,
                              ht[i:i + cfg.chunk_size], wt, cfg.loss, cfg.beta, cfg.chunk_size,
                              use_reentrant=False)
                   for i in range(0, hs.shape[0], cfg.chunk_size))
    return _kept_rows_forward_backward(student, teacher, rollouts, cfg, generator, loss)


def chunked_forward_backward(student, teacher, rollouts, cfg, generator):
    """The real step (opd_step.py, as distill.py calls it), unchanged."""
    metrics = opd_step.opd_step(student, teacher, rollouts, cfg, generator, {})  # {}: phase times
    return metrics["loss"], metrics["kept_tokens"]


FORWARD_BACKWARD = {"naive": naive_forward_backward, "gathered": gathered_forward_backward,
                    "recompute": recompute_forward_backward, "chunked": chunked_forward_backward}


# ---------------------------------------------------------------------------------------------
# One configuration, in its own process
# ---------------------------------------------------------------------------------------------

def setup(spec):
    """Teacher, student, optimizer, rollouts and the cfg that opd_step reads, from a spec."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, _ = loading.resolve_device(spec["device"])
    dtype, _ = loading.resolve_dtype(spec["dtype"], device)  # teacher and autocast dtype
    teacher = build_model(spec["teacher"], spec["vocab"], spec["seed"], device, dtype)
    teacher.eval().requires_grad_(False)
    student = build_model(spec["student"], spec["vocab"], spec["seed"] + 1, device, torch.float32)
    if spec["checkpointing"]:
        student.activation_checkpointing_enable()  # the 5.x name of gradient checkpointing
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.1)
    rollouts = make_rollouts(spec["batch"], spec["prompt_length"], spec["response_length"],
                             spec["vocab"], spec["seed"])
    cfg = argparse.Namespace(dtype=dtype, rule="all" if spec["keep"] == 1.0 else spec["rule"],
                             keep=spec["keep"], loss="reverse_kl", beta=0.5, pad_id=0,
                             chunk_size=spec["chunk_size"], micro_batch_size=spec["batch"],
                             micro_batch_tokens=spec["batch"] * (spec["prompt_length"]
                                                                 + spec["response_length"]),
                             importance_weights=False)
    return device, teacher, student, optimizer, rollouts, cfg


def measure(spec):
    """Warm-up steps, then measured steps: one row of the table."""
    device, teacher, student, optimizer, rollouts, cfg = setup(spec)
    peaks, step_peaks, seconds, first_loss = [], [], [], None
    for i in range(spec["warmup"] + spec["steps"]):
        generator = torch.Generator().manual_seed(spec["seed"] + i)  # same selection on each path
        baseline = start_memory_window(device)
        t0 = time.perf_counter()
        loss, n_kept = FORWARD_BACKWARD[spec["path"]](student, teacher, rollouts, cfg, generator)
        first_loss = loss if i == 0 else first_loss  # before any update: comparable across paths
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)  # step 7, as distill.train
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= spec["warmup"]:
            seconds.append(time.perf_counter() - t0)
            peaks.append(peak_memory(device))
            step_peaks.append(peaks[-1] - baseline)
    return {"path": spec["path"], "keep": spec["keep"], "rule": cfg.rule,
            "gradient_checkpointing": spec["checkpointing"], "kept_tokens": n_kept,
            "loss": first_loss, "peak_memory_bytes": max(peaks), "step_peak_bytes": max(step_peaks),
            "step_seconds": statistics.median(seconds), "device": device.type}


def projection_cost(spec):
    """What fp32 logits cost against a bf16 projection under autocast, for one `--chunk-size`
    chunk of the teacher's rows at the preset's vocabulary: the median time of each (5 runs, after
    one warm-up) and the fp32 copy of the teacher's head that tip.py makes per call."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, _ = loading.resolve_device(spec["device"])
    g = torch.Generator().manual_seed(spec["seed"])
    rows, width, vocab = spec["chunk_size"], spec["teacher"]["hidden"], spec["vocab"]
    head = torch.randn(vocab, width, generator=g).to(device, torch.bfloat16)  # (V, D_t) bf16
    hidden = torch.randn(rows, width, generator=g).to(device, torch.bfloat16)  # (n, D_t)

    def median_seconds(fn):
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def bf16():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return hidden @ head.T  # (n, V) bf16: what autocast alone would give
    head32 = head.float()  # (V, D_t): made once per call of token_stats / chunked_divergence
    return {"rows": rows, "vocab": vocab, "device": device.type,
            "fp32_seconds": median_seconds(lambda: tip.project(hidden, head32)),
            "bf16_seconds": median_seconds(bf16),
            "upcast_seconds": median_seconds(lambda: head.float()),
            "head_copy_bytes": head32.numel() * 4}


LOSSES = ("reverse_kl", "forward_kl", "jsd")  # JSD at β = 0.5: every β in (0, 1) runs the same code


def loss_cost(spec):
    """tip.chunked_divergence alone at the preset's head shapes (QWEN3_HEADS unless quick), with
    importance weights, for each of LOSSES: time of forward + backward over the four-GEMM floor,
    and its working set in fp32 (chunk, V) tensors.

    Floor: per chunk z_S = H_S W_Sᵀ and z_T = H_T W_Tᵀ into preallocated buffers, dH_S = G W_S and
    dW_S += Gᵀ H_S, on the same inputs. Time: CPU time (user + system, so page faults count) of
    one thread, which other processes' turns on a shared CPU do not inflate as they do wall time.
    The figure compares arithmetic with arithmetic: glibc keeps what it frees for reuse
    (memory.keep_freed_memory, what a caching allocator does, PyTorch's own on a GPU), so after a
    warm-up call the loss's fresh buffers and gradients reuse pages already touched, as the floor's
    preallocated ones are; the page faults of those calls are counted, to show it. After warm-ups,
    `repeats` rounds each time the floor and then every loss; each round gives one ratio per loss
    (loss / that round's floor), and the figure is the median ratio, with the range over rounds.
    Timed first, the same way: glibc's defaults, where every call mmaps its buffers and gradients
    afresh and faults them in page by page, with a call's faults and system seconds (up to the
    OS: on one virtual machine 0.4 to 2.8 s for the same call within an hour).
    Working set: the peak of the C heap during one forward + backward minus the heap before it
    (memory.HeapPeak, sampled at every aten op; torch's CPU allocator caches nothing, so the heap
    follows live tensors and kernels' buffers), less the (V, D_S) head gradient and the (rows,
    D_S) hidden gradient the call must return, over chunk × V × 4 bytes. Also the same from peak
    RSS (memory.py, Linux), which sees a kernel's temporaries within one op too but moves by about
    ±0.015 of a buffer between repeats."""
    torch.set_num_threads(1)
    shape = spec["head"]
    g = torch.Generator().manual_seed(spec["seed"])
    rows, chunk, vocab, ds = shape["rows"], shape["chunk_size"], shape["vocab"], shape["student_hidden"]
    hs = torch.randn(rows, ds, generator=g)  # (N, D_s)
    ws = torch.randn(vocab, ds, generator=g) / ds ** 0.5  # (V, D_s)
    ht = torch.randn(rows, shape["teacher_hidden"], generator=g)  # (N, D_t)
    wt = torch.randn(vocab, shape["teacher_hidden"], generator=g) / shape["teacher_hidden"] ** 0.5
    weights = torch.rand(rows, generator=g) + 0.5  # (N,) importance weights
    a, b = torch.empty(chunk, vocab), torch.empty(chunk, vocab)  # (chunk, V) each
    grad_hidden, grad_head = torch.empty(rows, ds), torch.zeros(vocab, ds)

    def floor():
        for i in range(0, rows, chunk):
            n = hs[i:i + chunk].shape[0]
            torch.mm(hs[i:i + chunk], ws.T, out=a[:n])
            torch.mm(ht[i:i + chunk], wt.T, out=b[:n])
            torch.mm(a[:n], ws, out=grad_hidden[i:i + n])
            grad_head.addmm_(a[:n].T, hs[i:i + chunk], beta=1 if i else 0)

    hs_, ws_ = hs.clone().requires_grad_(), ws.clone().requires_grad_()

    def forward_backward(loss):
        hs_.grad = ws_.grad = None
        tip.chunked_divergence(hs_, ws_, ht, wt, loss, 0.5, chunk, weights).backward()
        hs_.grad = ws_.grad = None

    def timed(fn, *args):  # (CPU seconds, of them system seconds, minor page faults)
        t0, sys0, faults0 = time.process_time(), os.times().system, minor_page_faults()
        fn(*args)
        return (time.process_time() - t0, os.times().system - sys0, minor_page_faults() - faults0)

    def rounds():  # {"floor" or loss: [timed(...) per round]}, interleaved
        out = {"floor": [], **{loss: [] for loss in LOSSES}}
        for _ in range(shape["repeats"]):
            out["floor"].append(timed(floor))
            for loss in LOSSES:
                out[loss].append(timed(forward_backward, loss))
        return out

    working_set, rss = {}, {}
    returned, buffer = (vocab + rows) * ds * 4, chunk * vocab * 4  # the two gradients; one (chunk, V)
    with HeapPeak():  # warm-up: the mode's first use allocates for itself
        torch.zeros(1)
    for loss in LOSSES:
        forward_backward(loss)  # warm-up
        baseline = start_memory_window(torch.device("cpu"))
        forward_backward(loss)
        rss[loss] = (peak_memory(torch.device("cpu")) - baseline - returned) / buffer
        with HeapPeak() as heap:
            forward_backward(loss)
        working_set[loss] = (heap.peak - heap.start - returned) / buffer
    floor()  # warm-up
    default = rounds()  # glibc's defaults: fresh pages every call
    with keep_freed_memory() as kept:
        for loss in LOSSES:  # warm-up: the heap grows to what the calls need, then reuses it
            forward_backward(loss)
        steady = rounds()

    def ratios(timings, loss):
        return [t[0] / f[0] for t, f in zip(timings[loss], timings["floor"])]

    out = []
    for loss in LOSSES:
        r = ratios(steady, loss)
        out.append({"loss": loss, "floor_seconds": statistics.median(t[0] for t in steady["floor"]),
                    "loss_seconds": statistics.median(t[0] for t in steady[loss]),
                    "time_ratio": statistics.median(r), "time_ratio_range": (min(r), max(r)),
                    "freed_memory_kept": kept, "page_faults": max(t[2] for t in steady[loss]),
                    "default_ratio": statistics.median(ratios(default, loss)),
                    "default_system_seconds": statistics.median(t[1] for t in default[loss]),
                    "default_page_faults": statistics.median(t[2] for t in default[loss]),
                    "working_set": working_set[loss], "working_set_rss": rss[loss], **shape})
    return out


def length_mix(name, seed):
    """Rollouts (ids of 1s) with the stated length mix of LENGTH_MIXES[name]."""
    mix, g = LENGTH_MIXES[name], torch.Generator().manual_seed(seed)

    def draw(median, sigma, lo, hi, n):  # n log-normal lengths, clipped to [lo, hi]
        return (median * torch.exp(sigma * torch.randn(n, generator=g))).long().clamp(lo, hi).tolist()
    prompts = [[1] * n for n in draw(*mix["prompt"], mix["prompts"]) for _ in range(mix["per_prompt"])]
    responses = draw(*mix["response"], len(prompts))
    cap = mix["total_cap"] or 10 ** 9
    return Rollouts(prompts, [[1] * min(n, cap - len(p)) for p, n in zip(prompts, responses)])


def padding_cost(seed, max_rollouts, max_tokens, old_micro_batch_size=4):
    """Computed / real tokens of each length mix: distill.py's cut (rollouts.micro_batches, at the
    real-model defaults) against the old one (rollout order, a fixed number per micro-batch, the
    prompts aligned by collate(align=True))."""
    out = {}
    for name in LENGTH_MIXES:
        r = length_mix(name, seed)
        real = sum(len(p) + len(q) for p, q in zip(r.prompts, r.responses))
        parts = micro_batches(r, max_rollouts, max_tokens)
        old = sum(collate(r.prompts[i:i + old_micro_batch_size], r.responses[i:i + old_micro_batch_size],
                          0)[0].numel() for i in range(0, len(r.prompts), old_micro_batch_size))
        out[name] = {"rollouts": len(r.prompts), "real_tokens": real, "micro_batches": len(parts),
                     "padding_ratio": sum(padded_tokens(p.prompts, p.responses) for p in parts) / real,
                     "old_padding_ratio": old / real}
    return out


# ---------------------------------------------------------------------------------------------
# Report: ratios, table, targets, JSON, plot
# ---------------------------------------------------------------------------------------------

def find(rows, path, keep, checkpointing=False):
    return next(r for r in rows if (r["path"], r["keep"], r["gradient_checkpointing"])
                == (path, keep, checkpointing))


def add_ratios(rows):
    """Each figure over the naive all-token step's (without checkpointing)."""
    ref = find(rows, "naive", 1.0)
    for r in rows:
        for key, ratio in (("peak_memory_bytes", "peak_memory_ratio"), ("step_seconds",
                           "step_time_ratio"), ("step_peak_bytes", "step_peak_ratio")):
            r[ratio] = r[key] / ref[key] if ref[key] else float("nan")
    return rows


def markdown_table(rows):
    scale, unit = (2 ** 30, "GiB") if find(rows, "naive", 1.0)["peak_memory_bytes"] >= 2 ** 30 \
        else (2 ** 20, "MiB")
    lines = [f"| path | keep | rule | ckpt | kept | loss | peak {unit} | × naive | step peak {unit} "
             "| × naive | step s | × naive |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['path']} | {r['keep']:g} | {r['rule']} | "
                     f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['kept_tokens']} | "
                     f"{r['loss']:.5f} | {r['peak_memory_bytes'] / scale:.2f} | "
                     f"{r['peak_memory_ratio']:.2f} | {r['step_peak_bytes'] / scale:.2f} | "
                     f"{r['step_peak_ratio']:.2f} | {r['step_seconds']:.3g} | "
                     f"{r['step_time_ratio']:.2f} |")
    return "\n".join(lines)


def standing_table(rows, losses, padding):
    """One table: the loss against its floor (time, memory), padding, the step against naive."""
    shape = losses[0]
    where = (f"D_S {shape['student_hidden']}, D_T {shape['teacher_hidden']}, V {shape['vocab']}, "
             f"{shape['rows']} rows in chunks of {shape['chunk_size']}")
    lines = ["| figure | value | target |", "|---|---|---|"]
    for r in losses:
        lo, hi = r["time_ratio_range"]
        reuse = (f"freed memory kept for reuse, {r['page_faults']} page faults in a call"
                 if r["freed_memory_kept"] else "glibc's defaults: no mallopt here")
        lines.append(f"| loss {r['loss']} forward + backward / four-GEMM floor, with weights "
                     f"({where}; one thread, CPU time, median of {r['repeats']} interleaved rounds, "
                     f"range {lo:.2f}–{hi:.2f}; {r['loss_seconds']:.3g} s / {r['floor_seconds']:.3g} s; "
                     f"{reuse}; with glibc's defaults a call faults in its buffers and gradients "
                     f"afresh, {r['default_page_faults']:.0f} page faults and "
                     f"{r['default_system_seconds']:.2f} s of system time: "
                     f"{r['default_ratio']:.2f}) | {r['time_ratio']:.2f} | ≤ 1.10 |")
    for r in losses:  # below ~16 MiB a (chunk, V) tensor is lost in the noise of the process's RSS
        buffer = r["chunk_size"] * r["vocab"] * 4  # bytes of one (chunk, V) fp32 tensor
        rss = f"{r['working_set_rss']:.3f}" if buffer >= 2 ** 24 else "n/a"
        rest = (r["working_set"] - 2) * buffer / 1024  # KiB beyond two buffers
        lines.append(f"| loss {r['loss']} working set beyond the gradients, fp32 (chunk, V) tensors "
                     f"(C heap peak at op boundaries, memory.HeapPeak; two buffers and {rest:.0f} "
                     f"KiB of per-row vectors, one-row scratch tiles and malloc's small blocks; "
                     f"peak RSS: {rss}) | {r['working_set']:.4f} | ≤ 2 + vectors |")
    for name, p in padding.items():
        lines.append(f"| padding: computed / real tokens, {name} mix ({p['rollouts']} rollouts, "
                     f"{p['micro_batches']} micro-batches; in rollout order 4 at a time: "
                     f"{p['old_padding_ratio']:.2f}) | {p['padding_ratio']:.2f} | ≤ 1.10 |")
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        r = find(rows, "chunked", keep)
        lines.append(f"| step, chunked keep {keep:g}: peak memory / naive all-token | "
                     f"{r['peak_memory_ratio']:.2f} | |")
        lines.append(f"| step, chunked keep {keep:g}: step time / naive all-token | "
                     f"{r['step_time_ratio']:.2f} | |")
    return "\n".join(lines)


def targets(rows):
    """(what, ratio, bound): memory is judged on the whole peak, the harder of the two measures."""
    half, full = find(rows, "chunked", 0.5), find(rows, "chunked", 1.0)
    return [("peak memory, chunked keep 0.5 / naive all-token", half["peak_memory_ratio"], 0.50),
            ("peak memory, chunked all-token / naive all-token", full["peak_memory_ratio"], 0.35),
            ("step time, chunked keep 0.5 / chunked keep 1.0",
             half["step_seconds"] / full["step_seconds"], 0.80)]


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, ckpt in [(p, False) for p in PATHS] + [("chunked", True)]:
        series = sorted((r for r in rows if r["path"] == name
                         and r["gradient_checkpointing"] == ckpt), key=lambda r: r["keep"])
        for ax, key, scale in ((axes[0], "peak_memory_bytes", 2**30), (axes[1], "step_seconds", 1)):
            ax.plot([r["keep"] for r in series], [r[key] / scale for r in series], "o-",
                    label=name + (" + ckpt" if ckpt else ""))
    for ax, ylabel in zip(axes, ("peak memory (GiB)", "step time (s)")):
        ax.set(xlabel="keep ratio", ylabel=ylabel, ylim=(0, None))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("one OPD step: naive full logits, gathered, chunked + recompute, chunked (fused)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# Settings and the run
# ---------------------------------------------------------------------------------------------

class DefaultsShown(argparse.HelpFormatter):
    """Every default shown as its value; a flag without one (None: the preset's) says so itself."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return action.help
        return f"{action.help} (default: {action.default})"


def parse_args(argv=None):
    p = loading.ArgumentParser(description="Peak memory and step time of one OPD step per memory "
                               "technique.", formatter_class=DefaultsShown)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shapes and sizes")
    p.add_argument("--quick", action="store_true", help="the 'quick' preset: a few seconds")
    p.add_argument("--vocab", type=int, help="vocabulary size V (default: preset's)")
    p.add_argument("--batch", type=int, help="rollouts B (default: preset's)")
    p.add_argument("--prompt-length", type=int, help="prompt tokens per rollout (default: preset's)")
    p.add_argument("--response-length", type=int, help="response tokens (default: preset's)")
    p.add_argument("--chunk-size", type=int, help="rows per lm_head chunk (default: preset's)")
    p.add_argument("--keeps", default="1.0,0.5,0.2,0.1", help="keep ratios; 1.0 is the baseline")
    p.add_argument("--rule", default="entropy", choices=list(selection.RULES),
                   help="selection rule below keep 1.0")
    p.add_argument("--steps", type=int, help="measured steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before those")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; quick: 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="teacher and autocast dtype (auto: bf16 on a GPU); the student's weights "
                   "stay fp32")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, rollouts, selection")
    p.add_argument("--json", help="write the rows as a JSON list to this path")
    p.add_argument("--plot", help="write a PNG of memory and time against keep to this path")
    return p.parse_args(argv)


def resolve_specs(args):
    """One spec dict per configuration: the preset, overridden by the flags that were given."""
    preset = PRESETS["quick" if args.quick else args.preset]
    keeps = [float(k) for k in args.keeps.split(",")]
    if 1.0 not in keeps or not all(0.0 < k <= 1.0 for k in keeps):
        raise SystemExit("error: --keeps must lie in (0, 1] and include 1.0, the baseline")
    base = {"rule": args.rule, "device": args.device, "dtype": args.dtype, "seed": args.seed,
            "warmup": args.warmup, "teacher": preset["teacher"], "student": preset["student"],
            "head": preset.get("head", QWEN3_HEADS)}
    fallback = {"steps": 3, "threads": 0}  # 0: torch's own thread count
    for key in ("vocab", "batch", "prompt_length", "response_length", "chunk_size", "steps",
                "threads"):
        given = getattr(args, key)
        base[key] = given if given is not None else preset.get(key, fallback.get(key))
    configurations = [(p, k, False) for p in PATHS for k in keeps] + [("chunked", k, True)
                                                                         for k in keeps]
    return [{**base, "path": p, "keep": k, "checkpointing": c} for p, k, c in configurations]


def main(argv=None):
    args = parse_args(argv)
    specs = resolve_specs(args)
    print("settings: " + json.dumps({k: v for k, v in specs[0].items()
                                     if k not in ("path", "keep", "checkpointing")}), flush=True)
    # A fresh process per configuration (max_tasks_per_child=1), forked from a server that
    # imported torch once and never ran a torch op, so no CUDA or thread-pool state is inherited.
    # A worker killed for memory raises BrokenProcessPool here.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers.models.qwen3.modeling_qwen3", "opd_step"])
    t0, rows = time.perf_counter(), []
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1)
    for spec in specs:
        r = pool.submit(measure, spec).result()
        rows.append(r)
        ckpt = "on " if r["gradient_checkpointing"] else "off"
        print(f"  {r['path']:9s} keep {r['keep']:<4g} ckpt {ckpt} | peak {r['peak_memory_bytes'] / 2**20:6.0f} MiB | step peak "
              f"{r['step_peak_bytes'] / 2**20:6.0f} MiB | {r['step_seconds']:.3g} s", flush=True)
    cost = pool.submit(projection_cost, specs[0]).result()
    losses = pool.submit(loss_cost, specs[0]).result()
    pool.shutdown()
    add_ratios(rows)
    print(f"\n{markdown_table(rows)}\n")
    print(f"where the step stands:\n{standing_table(rows, losses, padding_cost(args.seed, 64, 16384))}\n")
    print("targets (set for the default CPU configuration: elsewhere, information only):")
    for name, ratio, bound in targets(rows):
        print(f"target {name}: {ratio:.2f} (≤ {bound:.2f}) {'met' if ratio <= bound else 'MISSED'}")
    print(f"precision: one ({cost['rows']}, D) x (D, {cost['vocab']}) projection on {cost['device']}: "
          f"fp32 {cost['fp32_seconds'] * 1e3:.1f} ms vs bf16 autocast {cost['bf16_seconds'] * 1e3:.1f} ms "
          f"({cost['fp32_seconds'] / cost['bf16_seconds']:.2f}x), plus {cost['upcast_seconds'] * 1e3:.1f} "
          f"ms and {cost['head_copy_bytes'] / 2**20:.0f} MiB once per call for the teacher head's "
          "fp32 copy (on a CPU bf16 has no fast path: the GPU figure is the one that matters)")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
