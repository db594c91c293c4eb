"""On-policy distillation (OPD) with TIP token selection: the whole algorithm, top to bottom.

    python distill.py                                   # the embedded toy pair, CPU, no download
    python distill.py --teacher Qwen/Qwen3-4B --student Qwen/Qwen3-0.6B --rule entropy --keep 0.5

One optimizer step (../shared/TIP.md has the method, equations and the paper's numbers):
    1. Sample      the student samples `samples_per_prompt` rollouts per prompt (T = 1, top-p = 1).
    2. Teacher     the frozen teacher reads the same token ids -> final hidden states (B, L, D_t).
    3. Student     one student backbone forward *with* gradients -> hidden states (B, L, D_s).
    4. Statistics  from the detached hidden states, chunk by chunk: entropy, reverse and forward KL
                   at every response position, the normalised axes ĥ, δ̂ and the quadrants (tip.py).
    5. Select      the rule keeps max(1, ⌊keep·m⌋) positions of each rollout (selection.py).
    6. Loss        only the kept positions go through the two `lm_head`s, `chunk_size` rows at a
                   time, each chunk's gradient formed on the spot (tip.chunked_divergence), so
                   memory does not grow with (N × V).
    7. Step        AdamW, cosine schedule, grad-norm clip 1.0; a non-finite grad norm skips.
    8. Log         one line per step, the same record in <output-dir>/metrics.jsonl.
Steps 2-6 run per micro-batch of `--micro-batch-size` rollouts with gradient accumulation.

Notation: B rollouts, L sequence positions, V vocabulary, D hidden size, N response positions.
Positions: the hidden state at position i predicts token i+1, so response token y_t at sequence
index i is scored at position i-1 ("loss positions"). Prompt, padding and everything after the
first end-of-sequence never enter statistics, selection or loss; the EOS itself is trained on.

Where this departs from the paper, and why:
- The per-batch normalisation of ĥ and δ̂ and the quadrant thresholds are computed per
  micro-batch, because the statistics come from the same student forward that carries gradients
  (no second student forward). With `--micro-batch-size` equal to the step's rollouts (the toy
  default) this is exactly the paper's per-batch normalisation.
- The loss is the sum over kept tokens divided by the number of kept tokens in the whole step
  (not a mean of per-micro-batch means), so micro-batching does not change the gradient.
- grad-norm clip 1.0, weight decay 0.1 and skipping non-finite steps follow the authors' launcher.
- Duplicate prompts in the dataset are dropped; prompts longer than --max-prompt-length are
  skipped and counted, never truncated (loading.py).

Elsewhere: atomic checkpoints and --resume (checkpoint.py; data order and sampling are functions
of (seed, step), so a resumed run reproduces the uninterrupted one), torchrun + FSDP2
(parallel.py), and models, tokenizers and prompts (loading.py, which refuses bad input with one
line).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch

import selection
import tip
from checkpoint import latest_checkpoint, resume, save_checkpoint
from loading import (UsageError, check_same_tokenizer, check_writable, encode_prompts,
                     find_prompt_field, load_model, load_records, load_tokenizer, looks_like_path,
                     resolve_device, resolve_dtype)
from parallel import (all_reduce_sum, clip_grad_norm, distributed, gather, setup_distributed,
                      shard, teardown, world_size)

PAPER_DEFAULTS = dict(dataset="BytedTsinghua-SIA/DAPO-Math-17k", lr=1e-6, steps=200,
                      prompts_per_step=8, samples_per_prompt=16, max_new_tokens=8192,
                      micro_batch_size=4, generation_batch_size=32, warmup_steps=10)


# ---------------------------------------------------------------------------------------------
# 1. Sample: the student's own rollouts
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rollouts:
    prompts: list    # token ids of the prompt of each rollout
    responses: list  # sampled token ids, cut after the first EOS (the EOS kept)


def stop_ids(model, tokenizer):
    """Every id that ends a rollout: the tokenizer's EOS and the model's generation EOS list."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(prompts, responses, pad):
    """Left-pad prompts so every response starts at the same column P; right-pad responses.

    Returns input_ids (B, L), attention_mask (B, L) and loss_mask (B, L): True at the positions
    whose hidden state predicts a response token (index i-1 for the token at index i).
    """
    P = max(len(p) for p in prompts)
    L = P + max(max(len(r) for r in responses), 1)
    input_ids = torch.full((len(prompts), L), pad, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros(len(prompts), L, dtype=torch.long)  # (B, L)
    loss_mask = torch.zeros(len(prompts), L, dtype=torch.bool)  # (B, L)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[b, P - len(p):P + len(r)] = torch.tensor(p + r)
        attention_mask[b, P - len(p):P + len(r)] = 1
        loss_mask[b, P - 1:P - 1 + len(r)] = True
    return input_ids, attention_mask, loss_mask


def position_ids(attention_mask):
    """Positions that skip left padding, as `generate` computes them. (B, L) -> (B, L)."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def sample(model, tokenizer, prompts, samples_per_prompt=1, max_new_tokens=256, temperature=1.0,
           top_p=1.0, batch_size=32, progress=False):
    """Sample `samples_per_prompt` rollouts per prompt, `batch_size` sequences at a time so the KV
    cache fits. temperature 0 is greedy. Rollouts of one prompt are consecutive."""
    from transformers import GenerationConfig
    from tqdm import tqdm
    stops, pad = stop_ids(model, tokenizer), pad_id(tokenizer)
    # A fresh config: checkpoints ship sampling defaults (Qwen3: top_k 20, T 0.6) that would make
    # the rollouts come from a distribution other than P_S, the one the loss is taken under.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              top_p=top_p if temperature > 0 else None,
                              top_k=0 if temperature > 0 else None,
                              eos_token_id=sorted(stops), pad_token_id=pad)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    responses, was_training = [], model.training
    model.eval()
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(flat), batch_size), desc="sample", disable=not progress, leave=False):
        batch = flat[i:i + batch_size]
        P = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in batch], device=device)  # (b, P)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in batch], device=device)
        # synced_gpus: under FSDP every rank must run the same number of forward passes, so a
        # rank that finished keeps stepping until all have (no effect in one process)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             synced_gpus=distributed())
        for row in out[:, P:].tolist():  # (b, new)
            end = next((j for j, t in enumerate(row) if t in stops), None)
            responses.append(row if end is None else row[:end + 1])
    model.train(was_training)
    return Rollouts(prompts=flat, responses=responses)


# ---------------------------------------------------------------------------------------------
# 2-3. Forward passes that stop at the final hidden states (the lm_head is applied later, and
#      only where needed)
# ---------------------------------------------------------------------------------------------

def hidden_states(model, input_ids, attention_mask):
    """Final-layer hidden states of the backbone, without the lm_head. (B, L) -> (B, L, D)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


def lm_head(model):
    """The output projection weight (V, D); tied to the embeddings in small Qwen3 models."""
    return model.get_output_embeddings().weight


# ---------------------------------------------------------------------------------------------
# 6. The loss on selected positions: chunked, so no (N, V) tensor exists in forward or backward
# ---------------------------------------------------------------------------------------------

def selected_loss(student_hidden, student_head, teacher_hidden, teacher_head, loss="reverse_kl",
                  beta=0.5, chunk_size=512, weights=None, fused=True):
    """Σ_t w_t · D(P_S(·|c_t), P_T(·|c_t)) over the N given positions (a sum, not a mean).

    student_hidden (N, D_s) with gradients, teacher_hidden (N, D_t). `fused` (distill.py's path):
    tip.chunked_divergence, which builds each chunk's (chunk, V) logits once and turns them into
    the gradient on the spot, so peak memory is one chunk's logits, whatever N. Without it (a
    bench.py comparison), plain autograd: every chunk's logits stay alive until backward.
    """
    if fused:
        return tip.chunked_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                                      loss, beta, chunk_size, weights)
    vocab = min(student_head.shape[0], teacher_head.shape[0])  # common leading rows (TIP.md)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, student_hidden.shape[0], chunk_size):
        zs = student_hidden[i:i + chunk_size] @ student_head[:vocab].T  # (n, V), with gradients
        with torch.no_grad():
            zt = teacher_hidden[i:i + chunk_size] @ teacher_head[:vocab].T  # (n, V)
        per_token = tip.divergence(loss, zs, zt, beta)  # (n,) fp32, Eq. 1
        if weights is not None:
            per_token = per_token * weights[i:i + chunk_size]
        total = total + per_token.sum()
    return total


# ---------------------------------------------------------------------------------------------
# 4. Token statistics, normalised over the whole batch (all ranks under torchrun)
# ---------------------------------------------------------------------------------------------

def batch_statistics(student_hidden, student_head, teacher_hidden, teacher_head, mask, chunk_size):
    """Per-position statistics of a micro-batch, padded back to (B, L), plus ĥ, δ̂ and quadrants.

    Hidden states are (B, L, D) and detached; mask is the (B, L) loss mask. The normalisation and
    the thresholds see every rank's tokens, so N processes select what one process would.
    """
    flat = tip.token_stats(student_hidden[mask], student_head, teacher_hidden[mask], teacher_head,
                           chunk_size)  # dict of (N,)
    h, offset = gather(flat["entropy"])  # (N_all,)
    d, _ = gather(flat["reverse_kl"])  # (N_all,)
    every = torch.ones_like(h, dtype=torch.bool)  # (N_all,)
    h_hat, d_hat = tip.normalize_entropy(h, every), tip.normalize_divergence(d, every)
    quadrant, _ = tip.classify_quadrants(h_hat, d_hat, every)
    mine = slice(offset, offset + flat["entropy"].numel())
    flat.update(h_hat=h_hat[mine], d_hat=d_hat[mine], quadrant=quadrant[mine])
    return tip.to_padded(flat, mask)  # dict of (B, L)


# ---------------------------------------------------------------------------------------------
# Steps 2-6 for one optimizer step, over micro-batches with gradient accumulation
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def phase(times, name, device):
    """Add this block's wall time to times[name] (synchronising CUDA so the time is real)."""
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def opd_step(student, teacher, rollouts, cfg, generator, times):
    """Teacher pass, student pass, statistics, selection and loss per micro-batch, gradients
    accumulated into the student. Returns the step's token metrics (summed over ranks)."""
    device = next(student.parameters()).device
    autocast = (torch.autocast("cuda", dtype=cfg.dtype) if device.type == "cuda"
                and cfg.dtype != torch.float32 else contextlib.nullcontext())
    lengths = torch.tensor([len(r) for r in rollouts.responses])  # (B,)
    # The step's number of trained tokens follows from the lengths alone (each rollout keeps
    # max(1, ⌊keep·m⌋)), so every micro-batch can be divided by it before its backward.
    budget = lengths if cfg.rule == "all" else selection.budget(
        torch.arange(int(lengths.max())) < lengths[:, None], cfg.keep)  # (B,)
    n_kept_step = max(all_reduce_sum(int(budget.sum())), 1)
    sums = dict.fromkeys(("loss", "entropy", "reverse_kl", "n", "kept", "length"), 0.0)
    quad_all, quad_kept = torch.zeros(5), torch.zeros(5)
    ws, wt = lm_head(student), lm_head(teacher)
    for i in range(0, len(rollouts.responses), cfg.micro_batch_size):
        part = slice(i, i + cfg.micro_batch_size)
        ids, attn, mask = (t.to(device) for t in collate(rollouts.prompts[part],
                                                         rollouts.responses[part], cfg.pad_id))
        with phase(times, "teacher", device), torch.no_grad(), autocast:  # 2. frozen teacher
            h_t = hidden_states(teacher, ids, attn)  # (b, L, D_t)
        with phase(times, "student", device), autocast:  # 3. one forward, with gradients
            h_s = hidden_states(student, ids, attn)  # (b, L, D_s)
        with phase(times, "stats", device), autocast:  # 4. from the detached hidden states
            stats = batch_statistics(h_s.detach(), ws, h_t, wt, mask, cfg.chunk_size)
        with phase(times, "select", device):  # 5. positions to train on, per rollout
            kept, weights = selection.select(cfg.rule, stats, mask, cfg.keep, generator)
        with phase(times, "loss", device), autocast:  # 6. lm_heads on kept positions only
            w = weights[kept] if (cfg.importance_weights and weights is not None) else None
            loss_sum = selected_loss(h_s[kept], ws, h_t[kept], wt, cfg.loss, cfg.beta,
                                     cfg.chunk_size, w)  # (,) a sum over kept tokens
        with phase(times, "backward", device):
            # FSDP averages gradients over ranks, but each rank holds only a part of the sum over
            # the step's kept tokens: scaling by the world size turns that average into the sum.
            (loss_sum / n_kept_step * world_size()).backward()
        sums["loss"] += loss_sum.item()
        sums["entropy"] += stats["entropy"][mask].sum().item()
        sums["reverse_kl"] += stats["reverse_kl"][mask].sum().item()
        sums["n"] += int(mask.sum())
        sums["kept"] += int(kept.sum())
        quad_all += torch.bincount(stats["quadrant"][mask].cpu(), minlength=5)[:5].float()
        quad_kept += torch.bincount(stats["quadrant"][kept].cpu(), minlength=5)[:5].float()
    sums["length"] = float(lengths.sum())
    sums = {k: all_reduce_sum(v) for k, v in sums.items()}
    quad_all = torch.tensor([all_reduce_sum(q) for q in quad_all])
    quad_kept = torch.tensor([all_reduce_sum(q) for q in quad_kept])
    n = max(sums["n"], 1)
    metrics = {"loss": sums["loss"] / n_kept_step, "entropy": sums["entropy"] / n,
               "reverse_kl": sums["reverse_kl"] / n, "kept_fraction": sums["kept"] / n,
               "response_tokens": int(sums["n"]), "kept_tokens": int(sums["kept"]),
               "response_length": sums["length"] / max(all_reduce_sum(len(lengths)), 1)}
    for q in range(1, 5):
        metrics[f"q{q}_share"] = (quad_all[q] / max(quad_all.sum(), 1)).item()
        metrics[f"q{q}_kept_share"] = (quad_kept[q] / max(quad_kept.sum(), 1)).item()
    return metrics


def _proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from Linux's /proc."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def start_memory_window(device):
    """Reset the peak counter and return the memory in use now (the step's baseline), bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:  # Linux only (getrusage's peak cannot be reset)
        f.write("5")  # 5: reset this process's peak RSS (VmHWM) to its current RSS
    return _proc_status_bytes("VmRSS")


def peak_memory(device):
    """The peak since start_memory_window, bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


# ---------------------------------------------------------------------------------------------
# The run: settings, checkpoints, the loop over steps
# ---------------------------------------------------------------------------------------------

def prompt_order(n, step, per_step, seed):
    """Indices of the prompts of `step` (0-based): a fresh seeded permutation per epoch, so the
    data position is a function of the step alone and a resumed run sees the same prompts."""
    perms = {}
    for j in range(step * per_step, (step + 1) * per_step):
        if j // n not in perms:
            perms[j // n] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + j // n))
        yield int(perms[j // n][j % n])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="On-policy distillation with TIP token selection.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", help="teacher: HF id or local directory (default: the toy pair)")
    p.add_argument("--student", help="student: HF id or local directory (default: the toy pair)")
    p.add_argument("--rule", default="entropy", help=f"selection rule: {', '.join(selection.RULES)}")
    p.add_argument("--keep", type=float, default=0.5, help="keep ratio per rollout, in (0, 1]")
    p.add_argument("--loss", default="reverse_kl", help="reverse_kl (paper), forward_kl or jsd")
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight, in [0, 1]")
    p.add_argument("--importance-weights", action="store_true",
                   help="weight sampled tokens by 1/p (off: the paper's plain mean)")
    p.add_argument("--dataset", help="HF dataset id or local .jsonl/.json/.parquet "
                   "(default: DAPO-Math-17k, or the toy train split)")
    p.add_argument("--split", default="train", help="dataset split (hub datasets)")
    p.add_argument("--prompt-field", help="prompt column (default: auto-detect)")
    p.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are skipped")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 chat template thinking mode")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--prompts-per-step", type=int, help="prompts per optimizer step (all ranks)")
    p.add_argument("--samples-per-prompt", type=int, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, help="maximum response length")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--generation-batch-size", type=int, help="sequences per generate call")
    p.add_argument("--micro-batch-size", type=int, help="rollouts per forward/backward")
    p.add_argument("--chunk-size", type=int, default=512, help="rows per lm_head projection chunk")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-6; toy: its own)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW eps: the gradient scale "
                   "below which updates shrink instead of being normalised to full size")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing of the student (auto: on for CUDA)")
    p.add_argument("--max-skipped-steps", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite grad norm")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling, selection")
    p.add_argument("--output-dir", help="metrics.jsonl and checkpoints (default runs/<time>-<rule>-<keep>)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint "
                   "in --output-dir")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps, before the "
                   "first and after the last (0: never; the toy run evaluates before and after)")
    p.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True,
                   help="when evaluating, also evaluate the student before the first step")
    p.add_argument("--eval-benchmarks", help="comma list (default: toy for the toy pair, else math500)")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per problem (1: greedy)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N problems only")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repo code")
    return p.parse_args(argv)


def validate(args):
    """Everything that can be checked before a model is loaded: one clear line if not."""
    if args.rule not in selection.RULES:
        raise UsageError(f"unknown rule {args.rule!r}; valid rules: {', '.join(selection.RULES)}")
    if not 0.0 < args.keep <= 1.0:
        raise UsageError(f"--keep must be in (0, 1], got {args.keep}")
    if args.loss not in ("reverse_kl", "forward_kl", "jsd"):
        raise UsageError(f"unknown loss {args.loss!r}; valid: reverse_kl, forward_kl, jsd")
    if not 0.0 <= args.beta <= 1.0:
        raise UsageError(f"--beta must be in [0, 1], got {args.beta}")
    if (args.teacher is None) != (args.student is None):
        raise UsageError("give both --teacher and --student, or neither (the toy pair)")
    for who in ("teacher", "student"):
        name = getattr(args, who)
        if name and looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise UsageError(f"--{who} {name!r} is not a directory (a local model is a folder "
                             "written by save_pretrained)")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"unknown --dtype {args.dtype!r}; valid: auto, float32, bfloat16")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown --device {args.device!r}; valid: auto, cpu, cuda")
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                 "micro_batch_size", "generation_batch_size", "chunk_size", "max_skipped_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.output_dir:
        check_writable(args.output_dir)
        if os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")) and not args.resume:
            raise UsageError(f"--output-dir {args.output_dir!r} already holds a run: pass --resume "
                             "to continue it, or choose another folder")


def resolve_defaults(args):
    """Fill the unset settings: the toy pair's laptop defaults, or the paper's."""
    if args.teacher is None:
        import toy
        defaults = toy.DISTILL_DEFAULTS
        try:
            args.teacher, args.student = toy.build()
        except (FileExistsError, PermissionError) as e:
            raise UsageError(f"cannot build the toy pair: {e}")
        args.dataset = args.dataset or toy.split_path("train")
        args.eval_benchmarks = args.eval_benchmarks or "toy"
        args.toy = True
        torch.set_num_threads(toy.SETTINGS["threads"])  # the README's numbers on any core count
    else:
        defaults, args.toy = PAPER_DEFAULTS, False
        args.eval_benchmarks = args.eval_benchmarks or "math500"
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.output_dir = args.output_dir or os.path.join(
        "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{args.rule}-{args.keep:g}")
    return args


def evaluate_now(model, tokenizer, args):
    """Score the student on the eval benchmarks with evaluate.py's code (no second copy)."""
    import evaluate
    scores = {}
    for name in args.eval_benchmarks.split(","):
        summary = evaluate.evaluate_benchmark(
            model, tokenizer, name, samples=args.eval_samples,
            temperature=0.0 if args.eval_samples == 1 else 1.0, max_new_tokens=args.max_new_tokens,
            batch_size=args.generation_batch_size, enable_thinking=args.enable_thinking,
            limit=args.eval_limit, seed=args.seed)
        scores[f"eval/{name}/mean@{args.eval_samples}"] = summary["mean"]
        scores.update({f"eval/{name}/mean@{args.eval_samples}/{k[5:]}": v  # per part (the toy)
                       for k, v in summary.items() if k.startswith("mean/")})
    return scores


def log_line(r, steps):
    """The fixed-format line printed for every step (metrics defined in the README)."""
    quads = lambda key: "/".join(f"{r[f'q{q}_{key}']:.2f}" for q in range(1, 5))  # noqa: E731
    return (f"step {r['step']:4d}/{steps} | loss {r['loss']:.4f} | rkl {r['reverse_kl']:.4f} | "
            f"H {r['entropy']:.3f} | kept {r['kept_fraction']:.2f} | Q1-4 {quads('share')} "
            f"kept {quads('kept_share')} | len {r['response_length']:.0f} | "
            f"{r['tokens_per_s']:.0f} tok/s | mem {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
            f"{r['step_seconds']:.1f}s" + (" | SKIPPED: grad norm not finite" if r["skipped"] else ""))


def train(args):
    """Load everything, then run the optimizer steps. Returns (student, tokenizer, history)."""
    from transformers import get_cosine_schedule_with_warmup
    rank, world = setup_distributed(args.device)
    device, device_reason = resolve_device(args.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype, dtype_reason = resolve_dtype(args.dtype, device)
    if rank == 0:
        print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
        print(f"device: {device} ({device_reason}); dtype: {dtype} ({dtype_reason}); "
              "student master weights fp32")

    records = load_records(args.dataset, args.split)
    field = find_prompt_field(records, args.prompt_field)
    tokenizer = load_tokenizer(args.student, args.trust_remote_code)
    check_same_tokenizer(load_tokenizer(args.teacher, args.trust_remote_code), tokenizer)
    prompts, too_long = encode_prompts(tokenizer, records, field, args.max_prompt_length,
                                       args.enable_thinking)
    if args.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} must be divisible by the "
                         f"number of processes ({world})")
    checkpoint_dir = latest_checkpoint(args.output_dir) if args.resume else None
    if rank == 0:
        print(f"prompts: {len(prompts)} distinct from {args.dataset} (field {field!r}); "
              f"{too_long} longer than {args.max_prompt_length} tokens skipped")

    teacher = load_model(args.teacher, device, dtype, args.trust_remote_code)
    teacher.eval().requires_grad_(False)  # frozen: no gradients, no dropout
    student = load_model(checkpoint_dir or args.student, device, torch.float32, args.trust_remote_code)
    if min(lm_head(student).shape[0], lm_head(teacher).shape[0]) < len(tokenizer):
        raise UsageError("the teacher's and student's lm_heads have fewer rows than the tokenizer "
                         "has tokens")
    if args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto"
                                               and device.type == "cuda"):
        student.activation_checkpointing_enable()
    if world > 1:
        shard(teacher), shard(student)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  eps=args.adam_eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    cfg = argparse.Namespace(**{**vars(args), "dtype": dtype, "pad_id": pad_id(tokenizer)})

    start, history, metrics_path = 0, [], os.path.join(args.output_dir, "metrics.jsonl")
    if checkpoint_dir:  # resume: weights (above), optimizer, scheduler, step, RNG, metrics
        start, history = resume(checkpoint_dir, student, optimizer, scheduler, metrics_path, rank == 0)
        if rank == 0:
            print(f"resumed from {checkpoint_dir} at step {start}")
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(metrics_path, "a") if rank == 0 else None

    def write(record):
        history.append(record)
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()  # a kill loses at most the line being written

    evaluating = args.eval_every > 0 or args.toy
    if evaluating and start == 0 and args.eval_before:
        write({"step": 0, **evaluate_now(student, tokenizer, args)})
    skipped_in_a_row = 0
    for step in range(start + 1, args.steps + 1):
        t_step, times = time.perf_counter(), {}
        start_memory_window(device)  # peak memory is per step
        # Randomness is a function of (seed, step, rank): a resumed run draws what it would have.
        torch.manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
        with phase(times, "sample", device):  # 1. the student's own rollouts
            order = list(prompt_order(len(prompts), step - 1, args.prompts_per_step, args.seed))
            batch = [prompts[j] for j in order[rank::world]]  # this rank's share
            rollouts = sample(student, tokenizer, batch, args.samples_per_prompt,
                              args.max_new_tokens, args.temperature, args.top_p,
                              args.generation_batch_size)
        metrics = opd_step(student, teacher, rollouts, cfg, generator, times)  # 2-6
        with phase(times, "update", device):  # 7. the update, skipped if not finite
            grad_norm = clip_grad_norm(student, 1.0)
            skipped = not math.isfinite(grad_norm) or not math.isfinite(metrics["loss"])
            if not skipped:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t_step
        record = {"step": step, **metrics, "grad_norm": grad_norm, "skipped": skipped,
                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": metrics["response_tokens"] / seconds,
                  "peak_memory_bytes": peak_memory(device), "step_seconds": seconds,
                  **{f"time/{k}": v for k, v in times.items()}}
        if evaluating and ((args.eval_every and step % args.eval_every == 0) or step == args.steps):
            record.update(evaluate_now(student, tokenizer, args))
        write(record)  # 8. the record in metrics.jsonl, then the same as one fixed-format line
        if rank == 0:
            print(log_line(record, args.steps), flush=True)
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{step:06d}"),
                            student, tokenizer, optimizer, scheduler, step)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped_in_a_row >= args.max_skipped_steps:
            raise TrainingError(f"{skipped_in_a_row} steps in a row had a non-finite loss or grad "
                                "norm; stopping (lower --lr, or check the data)")
    if log:
        log.close()
    return student, tokenizer, history


class TrainingError(Exception):
    """The run cannot go on (e.g. repeated non-finite steps): one line, exit status 1."""


def main(argv=None):
    args = parse_args(argv)
    try:
        validate(args)
        args = resolve_defaults(args)
        _, _, history = train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; lower --micro-batch-size, --keep, --chunk-size, "
              "--samples-per-prompt or --max-new-tokens (or --generation-batch-size if it "
              "happened while sampling)", file=sys.stderr)
        sys.exit(1)
    teardown()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    if args.toy and len(evals) >= 2:
        key = next(k for k in evals[-1] if k.startswith("eval/"))
        parts = "".join(f", {k[len(key) + 1:]} {100 * evals[0][k]:.1f}% -> {100 * evals[-1][k]:.1f}%"
                        for k in evals[-1] if k.startswith(key + "/"))  # the toy's parts
        print(f"held-out accuracy ({key}): before {100 * evals[0][key]:.1f}% -> "
              f"after {100 * evals[-1][key]:.1f}%" + (f" ({parts[2:]})" if parts else ""))
    print(f"metrics and checkpoints in {args.output_dir}")


if __name__ == "__main__":
    main()
