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
                   time, each chunk recomputed in backward, so memory does not grow with (N × V).
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
  skipped and counted, never truncated.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

import selection
import tip

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_FIELDS = ("prompt", "problem", "question", "messages", "query", "instruction", "input")
PAPER_DEFAULTS = dict(dataset="BytedTsinghua-SIA/DAPO-Math-17k", lr=1e-6, steps=200,
                      prompts_per_step=8, samples_per_prompt=16, max_new_tokens=8192,
                      micro_batch_size=4, generation_batch_size=32, warmup_steps=10)


class UsageError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Set-up: device, dtype, models, tokenizers, prompts
# ---------------------------------------------------------------------------------------------

def resolve_device(name):
    """'auto' -> cuda when available, else cpu. Returns (device, reason)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), "auto: CUDA is available"
        return torch.device("cpu"), "auto: no CUDA device"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name), "as requested"


def resolve_dtype(name, device):
    """Compute dtype for the teacher and the student's autocast. The student's master weights
    stay fp32 whatever this says: with lr 1e-6, bf16 weights would round most updates away."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16 autocast on a GPU that supports it"
        return torch.float32, f"auto: fp32 on {device.type}"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name], "as requested"


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load tokenizer {name!r}: not a local directory and not reachable "
                         f"on the hub (offline use needs a local directory) [{type(e).__name__}]")


def load_model(name, device, dtype, trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {name!r}: not a local directory and not reachable "
                         f"on the hub (offline use needs a local directory) [{type(e).__name__}]")
    return model.to(device)


def check_same_tokenizer(teacher_tok, student_tok):
    """Teacher and student must map text to the same ids; refuse clearly otherwise."""
    vt, vs = teacher_tok.get_vocab(), student_tok.get_vocab()
    if vt != vs:
        diff = sorted(set(vt.items()) ^ set(vs.items()), key=lambda kv: kv[1])[:1]
        raise UsageError(f"teacher and student tokenizers differ ({len(vt)} vs {len(vs)} tokens; "
                         f"first difference {diff}): OPD scores the student's token ids with the "
                         "teacher, so both must share one tokenizer")


def load_records(dataset, split="train"):
    """Rows of an HF dataset id, or of a local .jsonl/.json/.parquet file, as a list of dicts."""
    import datasets
    datasets.disable_progress_bars()
    local = os.path.splitext(dataset)[1] in (".jsonl", ".json", ".parquet")
    if local and not os.path.isfile(dataset):
        raise UsageError(f"dataset file {dataset!r} does not exist")
    try:
        if local:
            kind = "parquet" if dataset.endswith(".parquet") else "json"
            rows = datasets.load_dataset(kind, data_files=dataset, split="train")
        else:
            rows = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # the hub raises many types; the user needs one line either way
        raise UsageError(f"cannot load dataset {dataset!r} (split {split!r}): "
                         f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
    rows = list(rows)
    if not rows:
        raise UsageError(f"dataset {dataset!r} is empty")
    return rows


def find_prompt_field(records, field=None):
    """The column holding the prompts: `field` if given, else the first of PROMPT_FIELDS present."""
    names = [field] if field else PROMPT_FIELDS
    for name in names:
        if name in records[0]:
            return name
    raise UsageError(f"no prompt field {'named ' + repr(field) if field else 'found'} in the dataset "
                     f"(columns: {', '.join(records[0])}); pass --prompt-field")


def format_problem(problem):
    """A bare problem plus the usual instruction to reason and box the final answer."""
    return f"{problem}\n{INSTRUCTION}"


def render_prompt(tokenizer, prompt, field="prompt", enable_thinking=False):
    """Chat-template text for one prompt: a message list as is; a plain string from a `prompt`
    column as is; a bare `problem`/`question` string gets the boxed-answer instruction."""
    if isinstance(prompt, str):
        text = prompt if field == "prompt" else format_problem(prompt)
        prompt = [{"role": "user", "content": text}]
    if tokenizer.chat_template is None:  # base models: plain text, no template
        return "\n".join(m["content"] for m in prompt) + "\n"
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def encode_prompts(tokenizer, records, field, max_prompt_length, enable_thinking=False):
    """Token ids of each distinct prompt; too-long prompts are skipped and counted."""
    seen, prompts, too_long = set(), [], 0
    for row in records:
        key = json.dumps(row[field], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        text = render_prompt(tokenizer, row[field], field, enable_thinking)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        prompts.append(ids)
    if not prompts:
        raise UsageError(f"every prompt is longer than --max-prompt-length {max_prompt_length} "
                         f"({too_long} skipped)")
    return prompts, too_long


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
                              top_p=top_p if temperature > 0 else None, top_k=0,
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
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
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
# 6. The loss on selected positions: chunked, each chunk's logits recomputed in backward
# ---------------------------------------------------------------------------------------------

def _chunk_divergence(hs, ws, ht, wt, loss, beta):
    zs = hs @ ws.T  # (n, V) student logits: the only tensor here that carries gradients
    with torch.no_grad():
        zt = ht @ wt.T  # (n, V) teacher logits
    return tip.divergence(loss, zs, zt, beta)  # (n,) fp32


def selected_loss(student_hidden, student_head, teacher_hidden, teacher_head, loss="reverse_kl",
                  beta=0.5, chunk_size=512, weights=None, recompute=True):
    """Σ_t w_t · D(P_S(·|c_t), P_T(·|c_t)) over the N given positions (a sum, not a mean).

    student_hidden (N, D_s) with gradients, teacher_hidden (N, D_t). With `recompute`, each chunk
    runs under activation checkpointing: the forward keeps only its inputs, and the backward
    rebuilds that chunk's (chunk, V) logits, so peak memory is one chunk's logits, whatever N.
    Without it (a bench.py comparison), every chunk's logits stay alive until backward.
    """
    vocab = min(student_head.shape[0], teacher_head.shape[0])  # common leading rows (TIP.md)
    ws, wt = student_head[:vocab], teacher_head[:vocab]  # (V, D_s), (V, D_t)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, student_hidden.shape[0], chunk_size):
        args = (student_hidden[i:i + chunk_size], ws, teacher_hidden[i:i + chunk_size], wt, loss, beta)
        if recompute:
            per_token = checkpoint(_chunk_divergence, *args, use_reentrant=False)  # (n,)
        else:
            per_token = _chunk_divergence(*args)  # (n,)
        if weights is not None:
            per_token = per_token * weights[i:i + chunk_size]
        total = total + per_token.sum()
    return total


# ---------------------------------------------------------------------------------------------
# One optimizer step: teacher pass -> student pass -> statistics -> select -> loss, per
# micro-batch, then the update.
# ---------------------------------------------------------------------------------------------

def batch_statistics(student_hidden, student_head, teacher_hidden, teacher_head, mask, chunk_size):
    """Step 4: per-position statistics of a micro-batch, padded back to (B, L), plus ĥ, δ̂ and the
    quadrants. Hidden states are (B, L, D) and detached; mask is the (B, L) loss mask."""
    flat = tip.token_stats(student_hidden[mask], student_head, teacher_hidden[mask], teacher_head,
                           chunk_size)  # dict of (N,)
    stats = {}
    for name, values in flat.items():
        stats[name] = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)  # (B, L)
        stats[name][mask] = values
    stats["h_hat"] = tip.normalize_entropy(stats["entropy"], mask)  # (B, L)
    stats["d_hat"] = tip.normalize_divergence(stats["reverse_kl"], mask)  # (B, L)
    stats["quadrant"], _ = tip.classify_quadrants(stats["h_hat"], stats["d_hat"], mask)
    return stats


def opd_step(student, teacher, rollouts, cfg, generator, timer):
    """Steps 2-6 over micro-batches, accumulating gradients. Returns the step's token metrics."""
    device = next(student.parameters()).device
    autocast = (torch.autocast("cuda", dtype=cfg.dtype) if device.type == "cuda"
                and cfg.dtype != torch.float32 else nullcontext())
    lengths = torch.tensor([len(r) for r in rollouts.responses])  # (B,)
    # The step's number of trained tokens is known from the lengths alone: it normalises the loss.
    budget = lengths if cfg.rule == "all" else selection.budget(
        torch.arange(int(lengths.max())) < lengths[:, None], cfg.keep)
    n_kept_step = max(int(budget.sum()), 1)
    sums = {"loss": 0.0, "entropy": 0.0, "reverse_kl": 0.0, "n": 0, "kept": 0}
    quad_all, quad_kept = torch.zeros(5), torch.zeros(5)
    ws, wt = lm_head(student), lm_head(teacher)
    for i in range(0, len(rollouts.responses), cfg.micro_batch_size):
        ids, attn, mask = (t.to(device) for t in collate(rollouts.prompts[i:i + cfg.micro_batch_size],
                           rollouts.responses[i:i + cfg.micro_batch_size], cfg.pad_id))
        with timer("teacher"), torch.no_grad(), autocast:  # 2. the frozen teacher
            h_t = hidden_states(teacher, ids, attn)  # (b, L, D_t)
        with timer("student"), autocast:  # 3. one student forward, with gradients
            h_s = hidden_states(student, ids, attn)  # (b, L, D_s)
        with timer("stats"), autocast:  # 4. statistics from detached hidden states
            stats = batch_statistics(h_s.detach(), ws, h_t, wt, mask, cfg.chunk_size)
        with timer("select"):  # 5. choose positions per rollout
            kept, weights = selection.select(cfg.rule, stats, mask, cfg.keep, generator)
        with timer("loss"), autocast:  # 6. loss on the kept positions only
            w = weights[kept] if (cfg.importance_weights and weights is not None) else None
            loss_sum = selected_loss(h_s[kept], ws, h_t[kept], wt, cfg.loss, cfg.beta,
                                     cfg.chunk_size, w)
        with timer("backward"):
            (loss_sum / n_kept_step).backward()
        sums["loss"] += loss_sum.item()
        sums["entropy"] += stats["entropy"][mask].sum().item()
        sums["reverse_kl"] += stats["reverse_kl"][mask].sum().item()
        sums["n"] += int(mask.sum())
        sums["kept"] += int(kept.sum())
        quad_all += torch.bincount(stats["quadrant"][mask].cpu(), minlength=5)[:5].float()
        quad_kept += torch.bincount(stats["quadrant"][kept].cpu(), minlength=5)[:5].float()
    n = max(sums["n"], 1)
    metrics = {"loss": sums["loss"] / n_kept_step, "entropy": sums["entropy"] / n,
               "reverse_kl": sums["reverse_kl"] / n, "kept_fraction": sums["kept"] / n,
               "response_tokens": sums["n"], "kept_tokens": sums["kept"],
               "response_length": float(lengths.float().mean())}
    for q in range(1, 5):
        metrics[f"q{q}_share"] = (quad_all[q] / max(quad_all.sum(), 1)).item()
        metrics[f"q{q}_kept_share"] = (quad_kept[q] / max(quad_kept.sum(), 1)).item()
    return metrics


class PhaseTimer:
    """Wall time per phase, summed over micro-batches: `with timer("teacher"): ...`."""

    def __init__(self, device):
        self.device, self.totals = device, {}

    def __call__(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":
                    torch.cuda.synchronize()
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0
        return _Phase()


def peak_memory_bytes(device):
    """CUDA max allocated since the last reset, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# The run: settings, the loop over steps, checkpoints
# ---------------------------------------------------------------------------------------------

def prompt_order(n, step, per_step, seed):
    """Indices of the prompts of `step`: a fresh seeded permutation per epoch, so the data position
    is a function of the step alone and a resumed run sees the same prompts."""
    @functools.lru_cache(maxsize=4)
    def epoch_perm(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [epoch_perm(j // n)[j % n] for j in range(step * per_step, (step + 1) * per_step)]


def save_checkpoint(path, student, tokenizer, optimizer, scheduler, step):
    """HF-format weights + tokenizer + trainer state, written to a temporary folder and renamed
    into place, so a kill during the save never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        import shutil
        shutil.rmtree(tmp)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


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
    p.add_argument("--prompts-per-step", type=int, help="prompts per optimizer step")
    p.add_argument("--samples-per-prompt", type=int, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, help="maximum response length")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--generation-batch-size", type=int, help="sequences per generate call")
    p.add_argument("--micro-batch-size", type=int, help="rollouts per forward/backward")
    p.add_argument("--chunk-size", type=int, default=512, help="rows per lm_head projection chunk")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-6; toy: its own)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing of the student (auto: on for CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling, selection")
    p.add_argument("--output-dir", help="where metrics.jsonl and checkpoints go "
                   "(default: runs/<time>-<rule>-<keep>)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: end only)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: never)")
    p.add_argument("--eval-benchmarks", help="benchmarks for --eval-every (default: toy for the toy "
                   "pair, else math500)")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per problem for evaluation")
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
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"unknown --dtype {args.dtype!r}; valid: auto, float32, bfloat16")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"unknown --device {args.device!r}; valid: auto, cpu, cuda")
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                 "micro_batch_size", "generation_batch_size", "chunk_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


def resolve_defaults(args):
    """Fill the unset settings: the toy pair's laptop defaults, or the paper's."""
    if args.teacher is None:
        import toy
        defaults = toy.DISTILL_DEFAULTS
        args.teacher, args.student = toy.build()
        args.dataset = args.dataset or toy.split_path("train")
        args.eval_benchmarks = args.eval_benchmarks or "toy"
        args.toy = True
    else:
        defaults, args.toy = PAPER_DEFAULTS, False
        args.eval_benchmarks = args.eval_benchmarks or "math500"
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.output_dir = args.output_dir or os.path.join(
        "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{args.rule}-{args.keep:g}")
    return args


def evaluate_now(model, tokenizer, args, step):
    """Score the student on the eval benchmarks with evaluate.py's code (no second copy)."""
    import evaluate
    scores = {}
    for name in args.eval_benchmarks.split(","):
        summary = evaluate.evaluate_benchmark(model, tokenizer, name, samples=args.eval_samples,
                                              temperature=0.0 if args.eval_samples == 1 else 1.0,
                                              max_new_tokens=args.max_new_tokens,
                                              batch_size=args.generation_batch_size,
                                              enable_thinking=args.enable_thinking,
                                              limit=args.eval_limit)
        scores[f"eval/{name}/mean@{args.eval_samples}"] = summary["mean"]
    return scores


def train(args):
    """Load everything, then run args.steps optimizer steps. Returns the list of step records."""
    from transformers import get_cosine_schedule_with_warmup
    device, device_reason = resolve_device(args.device)
    dtype, dtype_reason = resolve_dtype(args.dtype, device)
    print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"device: {device} ({device_reason}); dtype: {dtype} ({dtype_reason}); "
          "student master weights fp32")
    torch.manual_seed(args.seed)

    records = load_records(args.dataset, args.split)
    field = find_prompt_field(records, args.prompt_field)
    teacher_tok, tokenizer = load_tokenizer(args.teacher, args.trust_remote_code), \
        load_tokenizer(args.student, args.trust_remote_code)
    check_same_tokenizer(teacher_tok, tokenizer)
    prompts, too_long = encode_prompts(tokenizer, records, field, args.max_prompt_length,
                                       args.enable_thinking)
    print(f"prompts: {len(prompts)} distinct from {args.dataset} (field {field!r}), "
          f"{too_long} longer than {args.max_prompt_length} tokens skipped")

    teacher = load_model(args.teacher, device, dtype, args.trust_remote_code)
    teacher.eval().requires_grad_(False)  # frozen: no gradients, no dropout
    student = load_model(args.student, device, torch.float32, args.trust_remote_code)
    if min(lm_head(student).shape[0], lm_head(teacher).shape[0]) < len(tokenizer):
        raise UsageError("the teacher's and student's lm_heads share fewer rows than the tokenizer "
                         "has tokens")
    if args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto"
                                               and device.type == "cuda"):
        student.activation_checkpointing_enable()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    cfg = argparse.Namespace(**{**vars(args), "dtype": dtype, "pad_id": pad_id(tokenizer)})

    os.makedirs(args.output_dir, exist_ok=True)
    history = []
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as log:
        for step in range(1, args.steps + 1):
            t_step = time.perf_counter()
            timer = PhaseTimer(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(args.seed * 1_000_003 + step)  # sampling: a function of (seed, step)
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # selection
            with timer("sample"):  # 1. the student's own rollouts
                batch = [prompts[j] for j in prompt_order(len(prompts), step - 1,
                                                          args.prompts_per_step, args.seed)]
                rollouts = sample(student, tokenizer, batch, args.samples_per_prompt,
                                  args.max_new_tokens, args.temperature, args.top_p,
                                  args.generation_batch_size)
            metrics = opd_step(student, teacher, rollouts, cfg, generator, timer)  # 2-6
            with timer("update"):  # 7. the update, skipped if the gradient is not finite
                grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0).item()
                skipped = not math.isfinite(grad_norm)
                if not skipped:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t_step
            record = {"step": step, **metrics, "grad_norm": grad_norm, "skipped": skipped,
                      "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": metrics["response_tokens"] / seconds,
                      "peak_memory_bytes": peak_memory_bytes(device), "step_seconds": seconds,
                      **{f"time/{k}": v for k, v in timer.totals.items()}}
            if args.eval_every and step % args.eval_every == 0:
                record.update(evaluate_now(student, tokenizer, args, step))
            # 8. one fixed-format line, the same record in metrics.jsonl
            print(f"step {step:4d}/{args.steps} | loss {record['loss']:.4f} | "
                  f"rkl {record['reverse_kl']:.4f} | H {record['entropy']:.3f} | "
                  f"kept {record['kept_fraction']:.2f} | Q1-4 "
                  + "/".join(f"{record[f'q{q}_share']:.2f}" for q in range(1, 5))
                  + " kept " + "/".join(f"{record[f'q{q}_kept_share']:.2f}" for q in range(1, 5))
                  + f" | len {record['response_length']:.0f} | {record['tokens_per_s']:.0f} tok/s"
                  f" | mem {record['peak_memory_bytes'] / 2**30:.2f} GiB | {seconds:.1f}s"
                  + (" | SKIPPED: grad norm not finite" if skipped else ""), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            history.append(record)
            if (args.save_every and step % args.save_every == 0) or step == args.steps:
                save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{step:06d}"),
                                student, tokenizer, optimizer, scheduler, step)
    return student, tokenizer, history


def main(argv=None):
    args = parse_args(argv)
    try:
        validate(args)
        args = resolve_defaults(args)
        train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
