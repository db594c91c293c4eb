"""Checkpoints that survive a kill, and resuming from them (used by distill.py).

A checkpoint folder `checkpoint-<step>` holds HF-format weights and tokenizer (`from_pretrained`
loads it like any model) plus trainer_state.pt: optimizer, scheduler, step and RNG states. It is
written as `<name>.tmp` and renamed into place, so a kill during a save leaves the previous
checkpoint intact and never a half-written one. The data order and every sampling seed are
functions of (seed, step, rank) in distill.py, so weights, optimizer, scheduler and step are all
that a resumed run needs to reproduce the uninterrupted one (tests/test_reliability.py).

Under torchrun the full (unsharded) state dicts are gathered to rank 0, which alone writes.
"""
import json
import os
import shutil

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from parallel import distributed


def save_checkpoint(path, student, tokenizer, optimizer, scheduler, step):
    """Write the checkpoint of `step` to `path` atomically. Every rank must call it."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(student, options=full)
    optimizer_state = get_optimizer_state_dict(student, optimizer, options=full)  # keyed by name
    if distributed() and torch.distributed.get_rank() != 0:
        return
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a save that was killed
    student.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, "trainer_state.pt"))
    os.replace(tmp, path)  # atomic on POSIX: the checkpoint appears whole or not at all


def latest_checkpoint(output_dir):
    """The newest complete checkpoint folder in output_dir, or None (`.tmp` ones are partial)."""
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-")
                   and not n.endswith(".tmp")) if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, names[-1]) if names else None


def resume(checkpoint_dir, student, optimizer, scheduler, metrics_path, main_process=True):
    """Restore optimizer, scheduler and RNG from checkpoint_dir into a student already loaded from
    it, and cut metrics.jsonl back to the checkpoint's step (the killed run may have logged steps
    after its last save). Returns (step, the metrics records up to it)."""
    state = torch.load(os.path.join(checkpoint_dir, "trainer_state.pt"), weights_only=False)
    set_optimizer_state_dict(student, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    # (distill.py reseeds every step anyway; the states only match the same number of GPUs)
    if state["cuda_rng"] is not None and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    step, history = state["step"], []
    if main_process:
        history = [json.loads(line) for line in open(metrics_path) if line.strip()]
        history = [r for r in history if r["step"] <= step]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        os.replace(metrics_path + ".tmp", metrics_path)
    return step, history
