"""On-policy distillation (OPD) with TIP token selection: the run, top to bottom.

    python distill.py                                   # the laptop pair, CPU, no download
    python distill.py --teacher Qwen/Qwen3-4B --student Qwen/Qwen3-0.6B --rule entropy --keep 0.5

The method, the eight steps of one optimizer step and every departure from the paper are written
down once, in docs/method.md; this file follows that list section by section: 1 sample, 2-6
(teacher, student, statistics, select, loss: opd_step.py, one function that bench.py measures as
it is), 7 step, 8 log, then the run and its CLI.

Notation: B rollouts, T padded sequence positions (prompt + response), V vocabulary, D hidden
size; N the positions that are trained on (response tokens the student generated), n the kept
ones. The hidden state at position i predicts token i+1, so response token y_t at sequence index i
is scored at position i-1 ("loss positions"). Prompt, padding, everything after the first
end-of-sequence, and response tokens the student did not generate (tool results in an episode)
never enter statistics, selection or loss; the EOS itself is trained on.

What is trained on comes from a task (tasks.py: items, rollouts, benchmarks); this file names none.
Elsewhere: sampling (rollouts.py), models, tokenizers and one-line errors (loading.py), checkpoints
(checkpoint.py), torchrun (parallel.py), peak memory (memory.py).
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

import evaluate
import selection
import tasks
import tracking
from checkpoint import latest_checkpoint, resume, save_checkpoint
from loading import (ArgumentParser, UsageError, add_model_flags, check_context, check_output_head,
                     check_pair, check_same_tokenizer, check_writable, lm_head,
                     load_model, load_tokenizer, prompt_order, resolve_device, resolve_dtype)
from memory import peak_memory, phase, start_memory_window
from opd_step import StepSettings, opd_step
from parallel import all_reduce_sum, clip_grad_norm, setup_distributed, shard, teardown
from rollouts import pad_id

# Real models: the paper's settings (Table 9; it gives no warm-up, the authors' launcher uses 0)
# where it has one, else ours; a task may change some (tasks.py: its `defaults`).
PAPER_DEFAULTS = dict(lr=1e-6, prompts_per_step=8, samples_per_prompt=16, max_new_tokens=8192,
                      max_prompt_length=2048, warmup_steps=0)
OUR_DEFAULTS = dict(steps=200, micro_batch_size=64, micro_batch_tokens=16384, generation_batch_size=32)
REAL_DEFAULTS = {**PAPER_DEFAULTS, **OUR_DEFAULTS}


# ---------------------------------------------------------------------------------------------
# 1. Sample: the student's own rollouts (from P_S exactly), or its own tool-use episodes
# ---------------------------------------------------------------------------------------------

def rollouts_of_step(task, student, tokenizer, batch, sampling):
    """This rank's rollouts of the step's items (`batch`), sampled by the task, and the task's
    per-episode means over every rank's episodes (episode/<name>; none for single-turn tasks)."""
    rollouts, sums, count = task.rollouts(student, tokenizer, batch, sampling)
    episodes = max(all_reduce_sum(count), 1)
    return rollouts, {f"episode/{k}": all_reduce_sum(v) / episodes for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------
# 2-6. Teacher pass, student pass, statistics, selection and loss: opd_step.py's `opd_step`
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 7. Step: clip the gradient norm, then update the student unless the step is not finite
# ---------------------------------------------------------------------------------------------

def update(student, optimizer, scheduler, loss):
    """Clip at norm 1, step AdamW unless the loss or the norm is not finite (the step is skipped
    and counted), advance the schedule either way. Returns (grad_norm, skipped)."""
    grad_norm = clip_grad_norm(student, 1.0)
    skipped = not math.isfinite(grad_norm) or not math.isfinite(loss)
    if not skipped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


# ---------------------------------------------------------------------------------------------
# 8. Log: one fixed-format line per step; the same record in metrics.jsonl
# ---------------------------------------------------------------------------------------------

def log_line(r, steps):
    """The line printed for every step (metrics defined in the README)."""
    quads = lambda key: "/".join(f"{r[f'q{q}_{key}']:.2f}" for q in range(1, 5))  # noqa: E731
    return (f"step {r['step']:4d}/{steps} | loss {r['loss']:.4f} | rkl {r['reverse_kl']:.4f} | "
            f"H {r['entropy']:.3f} | kept {r['kept_fraction']:.2f} | Q1-4 {quads('share')} "
            f"kept {quads('kept_share')} | len {r['response_length']:.0f} | "
            f"{r['tokens_per_s']:.0f} tok/s | mem {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
            f"{r['step_seconds']:.1f}s" + (" | SKIPPED: loss or grad norm not finite"
                                           if r["skipped"] else ""))


# ---------------------------------------------------------------------------------------------
# The run: settings, checkpoints, the loop over steps
# ---------------------------------------------------------------------------------------------

def task_settings(args):
    """What the task reads, from the flags: its data, and sampling as training samples."""
    given = {f: getattr(args, f) for f in tasks.TASK_FLAGS if getattr(args, f, None) is not None}
    return tasks.Settings(max_prompt_length=args.max_prompt_length, enable_thinking=args.enable_thinking,
                          samples=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.generation_batch_size,
                          benchmarks=tuple(args.eval_benchmarks.split(",")), **given)


def train(args):
    """Load everything, then run the optimizer steps. Returns (student, tokenizer, history)."""
    from transformers import get_cosine_schedule_with_warmup
    task, sampling = tasks.get(args.task), task_settings(args)
    rank, world = setup_distributed(args.device)
    device, device_reason = resolve_device(args.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype, dtype_reason = resolve_dtype(args.dtype, device)
    if rank == 0:
        print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
        print(f"device: {device} ({device_reason}); dtype: {dtype} ({dtype_reason}); student "
              "master weights fp32; logits fp32")

    tokenizer = load_tokenizer(args.student, args.trust_remote_code)
    check_same_tokenizer(load_tokenizer(args.teacher, args.trust_remote_code), tokenizer)
    items, too_long = task.items(tokenizer, sampling)  # prompt ids, or tasks to play
    if args.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} must be divisible by the "
                         f"number of processes ({world})")
    checkpoint_dir = latest_checkpoint(args.output_dir) if args.resume else None
    if rank == 0:
        print(f"prompts: {len(items)} distinct from {task.describe(sampling)}; "
              f"{too_long} longer than {args.max_prompt_length} tokens skipped")
    check_context((("--teacher", args.teacher), ("--student", args.student)),
                  *task.positions(items, sampling), args.trust_remote_code)  # before any generate

    teacher = load_model(args.teacher, device, dtype, args.trust_remote_code)
    teacher.eval().requires_grad_(False)  # frozen: no gradients, no dropout
    student = load_model(checkpoint_dir or args.student, device, torch.float32, args.trust_remote_code)
    for name, model in ((args.teacher, teacher), (args.student, student)):
        check_output_head(model, name)
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
    cfg = StepSettings(args.rule, args.keep, args.loss, args.beta, args.importance_weights,
                       args.chunk_size, args.micro_batch_size, args.micro_batch_tokens, dtype,
                       pad_id(tokenizer))
    evaluation = replace(sampling, samples=args.eval_samples, top_p=1.0, seed=args.seed,
                         temperature=0.0 if args.eval_samples == 1 else 1.0, limit=args.eval_limit)

    start, history, metrics_path = 0, [], os.path.join(args.output_dir, "metrics.jsonl")
    if checkpoint_dir:  # resume: weights (above), optimizer, scheduler, step, RNG, metrics
        start, history = resume(checkpoint_dir, student, optimizer, scheduler, metrics_path, rank == 0)
        if rank == 0:
            print(f"resumed from {checkpoint_dir} at step {start}")
    tracker = tracking.start(args.report_to, args.output_dir, rank, start, args.run_name, args.run_group,
                             vars(args))  # --report-to: rank 0's trackers (the settings their config)
    os.makedirs(args.output_dir, exist_ok=True)

    def write(record, tokens=None):  # opened per record: a kill loses at most the line being written
        history.append(record)
        if rank == 0:
            with open(metrics_path, "a") as log:
                log.write(json.dumps(record) + "\n")
            tracker.log(record, tokens)  # a copy for the trackers; never stops the run

    evaluating = args.eval_every > 0 or args.laptop  # the laptop run evaluates before and after
    if evaluating and start == 0 and args.eval_before:
        write({"step": 0, **evaluate.during_training(student, tokenizer, evaluation.benchmarks, evaluation)})
    skipped_in_a_row = 0
    for step in range(start + 1, args.steps + 1):
        t_step, times = time.perf_counter(), {}
        start_memory_window(device)  # peak memory is per step
        # Randomness is a function of (seed, step, rank): a resumed run draws what it would have.
        torch.manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
        with phase(times, "sample", device):  # 1. the student's own rollouts (or episodes)
            order = list(prompt_order(len(items), step - 1, args.prompts_per_step, args.seed))
            batch = [items[j] for j in order[rank::world]]  # this rank's share
            rollouts, episode_means = rollouts_of_step(task, student, tokenizer, batch, sampling)
        tokens = tracker.tokens()  # a list when a tracker will draw the step's quadrant picture
        metrics = {**opd_step(student, teacher, rollouts, cfg, generator, times, tokens),  # 2-6
                   **episode_means}
        with phase(times, "update", device):  # 7. clip, then update unless not finite
            grad_norm, skipped = update(student, optimizer, scheduler, metrics["loss"])
        seconds = time.perf_counter() - t_step
        record = {"step": step, **metrics, "grad_norm": grad_norm, "skipped": skipped,
                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": metrics["response_tokens"] / seconds,
                  "peak_memory_bytes": peak_memory(device), "step_seconds": seconds,
                  **{f"time/{k}": v for k, v in times.items()}}
        if evaluating and ((args.eval_every and step % args.eval_every == 0) or step == args.steps):
            record.update(evaluate.during_training(student, tokenizer, evaluation.benchmarks, evaluation))
        write(record, tokens)  # 8. the record in metrics.jsonl, then as one fixed-format line
        if rank == 0:
            print(log_line(record, args.steps), flush=True)
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{step:06d}"),
                            student, tokenizer, optimizer, scheduler, step)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped_in_a_row >= args.max_skipped_steps:
            raise TrainingError(f"{skipped_in_a_row} steps in a row had a non-finite loss or grad "
                                "norm; stopping (lower --lr, or check the data)")
    tracker.close()
    return student, tokenizer, history


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------

def both(name):
    """Help text naming a flag's default for the laptop pair, for real models, and per task."""
    whose = "the paper's" if name in PAPER_DEFAULTS else "ours"
    laptop = tasks.TASKS[tasks.DEFAULT].laptop
    per_task = "".join(f"; --task {t.name}: {t.defaults[name]}" for t in tasks.TASKS.values()
                       if name in t.defaults)
    return (f"(laptop pair: {laptop[name]}; " if name in laptop else "(") + \
        f"real models: {REAL_DEFAULTS[name]}, {whose}{per_task})"


def parse_args(argv=None):
    p = ArgumentParser(description="On-policy distillation with TIP token selection.")
    p.add_argument("--teacher", help="teacher: HF id or local directory (default: the laptop pair)")
    p.add_argument("--student", help="student: HF id or local directory (default: the laptop pair)")
    p.add_argument("--rule", default="entropy", choices=list(selection.RULES), help="selection rule")
    p.add_argument("--keep", type=float, default=0.5, help="keep ratio per rollout, in (0, 1]")
    p.add_argument("--loss", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"],
                   help="per-token loss on kept tokens (reverse_kl: the paper's)")
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight, in [0, 1]")
    p.add_argument("--importance-weights", action="store_true",
                   help="weight sampled tokens by 1/p (off: the paper's plain mean)")
    default = tasks.TASKS[tasks.DEFAULT]
    tasks.add_flags(p, dataset_help="HF dataset id or local .jsonl/.json/.parquet (laptop pair: its "
                    f"train split; real models: {default.defaults.get('dataset')}, ours)")
    p.add_argument("--max-prompt-length", type=int, help="longer prompts are skipped, never truncated "
                   + both("max_prompt_length"))
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 chat template thinking mode")
    for flag, text in (("steps", "optimizer steps"), ("prompts-per-step", "prompts per optimizer "
                       "step (all ranks)"), ("samples-per-prompt", "rollouts per prompt"),
                       ("max-new-tokens", "maximum response length (of one turn, in an episode)"),
                       ("generation-batch-size", "sequences per generate call"),
                       ("micro-batch-size", "at most this many rollouts per forward/backward"),
                       ("micro-batch-tokens", "at most this many padded positions per forward/backward"),
                       ("warmup-steps", "linear warm-up steps before the cosine decay")):
        p.add_argument(f"--{flag}", type=int, help=f"{text} {both(flag.replace('-', '_'))}")
    p.add_argument("--lr", type=float, help=f"peak learning rate {both('lr')}")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the paper's)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (the paper's)")
    p.add_argument("--chunk-size", type=int, default=512,
                   help="rows per lm_head projection chunk (the paper's)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay (ours, from the authors' launcher)")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW eps (README: verdict (d))")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing of the student (auto: on for CUDA)")
    p.add_argument("--max-skipped-steps", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or grad norm")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling, selection")
    p.add_argument("--output-dir", help="metrics.jsonl and checkpoints "
                   "(default: runs/<time>-<rule>-<keep>)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint "
                   "in --output-dir")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps, before the "
                   "first and after the last (0: never; the laptop run evaluates before and after)")
    p.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True,
                   help="when evaluating, also evaluate the student before the first step")
    p.add_argument("--eval-benchmarks", help="comma list (default: the task's: " + "; ".join(
        f"--task {t.name}: {','.join(t.default_benchmarks())}" for t in tasks.TASKS.values())
        + f"; laptop pair: {default.laptop.get('eval_benchmarks')})")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per problem (1: greedy)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N problems only")
    tracking.add_flag(p)
    add_model_flags(p, "teacher dtype and the student's autocast (auto: bf16 on a GPU)")
    return p.parse_args(argv)


def validate(args):
    """Everything that can be checked before a model is loaded: one clear line if not."""
    if not 0.0 < args.keep <= 1.0:
        raise UsageError(f"--keep must be in (0, 1], got {args.keep}")
    if not 0.0 <= args.beta <= 1.0:
        raise UsageError(f"--beta must be in [0, 1], got {args.beta}")
    check_pair(args.teacher, args.student)  # both or neither; a local model is a folder
    tasks.check(tasks.get(args.task), vars(args))  # a flag it would ignore, its own checks: one line
    tracking.check(args.report_to)  # a chosen tracker that is not installed: one line
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size",
                 "micro_batch_tokens", "generation_batch_size", "chunk_size", "max_skipped_steps",
                 "max_turns", "max_total_tokens", "max_prompt_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.output_dir:
        check_writable(args.output_dir)
        if os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")) and not args.resume:
            raise UsageError(f"--output-dir {args.output_dir!r} already holds a run: pass --resume "
                             "to continue it, or choose another folder")


def resolve_defaults(args):
    """Fill the unset settings: the task's laptop pair and its settings, or the real-model ones."""
    task = tasks.get(args.task)
    args.laptop = args.teacher is None
    if args.laptop:  # the task's own small pair, built once into a cache
        args.teacher, args.student, defaults = task.laptop_pair()
    else:
        defaults = {**REAL_DEFAULTS, **task.defaults}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.eval_benchmarks = args.eval_benchmarks or ",".join(task.default_benchmarks())
    args.output_dir = args.output_dir or os.path.join(
        "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{args.rule}-{args.keep:g}")
    return args


class TrainingError(Exception):
    """The run cannot go on (repeated non-finite steps): one line, exit status 1."""


def main(argv=None):
    args = parse_args(argv)
    try:
        validate(args)
        args = resolve_defaults(args)
        _, _, history = train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingError, selection.RuleContractError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; lower --micro-batch-size, --keep, --chunk-size, --samples-"
              "per-prompt, --max-new-tokens or --generation-batch-size", file=sys.stderr)
        sys.exit(1)
    teardown()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    print(evaluate.before_and_after(history) or "", end="")  # first and last evaluation, if two
    print(f"metrics and checkpoints in {args.output_dir}")


if __name__ == "__main__":
    main()
