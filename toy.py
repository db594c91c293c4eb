"""The toy pair: two small Qwen3 models (~0.8M parameters) on the toy task (toy_task.py), so that
`python distill.py` distils a real student on a laptop CPU, no download.

    python toy.py                     # install the shipped pair into the cache (seconds)
    python toy.py --force             # train it anew on this machine (minutes on one core)
    python toy.py --cache-dir DIR --seed 3 # another pair elsewhere (or set TIP_TOY_CACHE)
    python toy.py ship                # maintainers: commit the cache's seed-0 pair as data/toy_pair

Contract (what the other files import; the task's names are re-exported from toy_task):
  build(cache_dir, seed, force)     the pair in the cache -> (teacher_dir, student_dir): reused,
                                    installed from data/toy_pair, or trained; a build appears
                                    whole (temp folder, then rename); another pair there is refused
  split_path(name), load_split(..)  the "train" / "heldout" JSONL splits that build() wrote
  DISTILL_DEFAULTS                  the laptop settings of `python distill.py` on the toy pair

How the pair is made: the teacher is trained on the right solutions for `steps`. The student is
the teacher's run at `student_from_step` (a fixed step, not a target accuracy), then
`student_steps` more supervised steps on the same problems worked with the dropped carry, the loss
at the dropped carry weighted `carry_weight` times. The weight makes the misconception confident:
about half of all response tokens are format characters the student never doubts, so the median
entropy split sits very low, and a carry token learned with an ordinary weight lands just above it
or just below it depending on the CPU (Q1 or Q3 by a hair). Weighted, it sits far below. Same
architecture and tokenizer, so the student has the capacity to catch up under on-policy
distillation, and both kinds of mistake are its own most likely tokens.

Why a shipped pair: a pair trained on another CPU is another pair (AVX-512, AVX2 and ARM kernels
round differently, and a few ulps early in training move the student by points). data/toy_pair
holds the seed-0 pair the README's figures come from; its stamp carries the key of the settings
and of the source of the functions that build it (BUILD_CODE), and a test fails when the two part.

Notation: B items in a batch, T positions, V vocabulary (99).
"""
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import tempfile
import time

import torch
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from loading import ArgumentParser, render_prompt
from rollouts import sample
from toy_task import (CARRY_INDEX, CHARACTERS, PARTS, SPECIAL_TOKENS, carry_flags,  # noqa: F401
                      greedy_accuracy, make_item, make_problems, make_splits,
                      make_tokenizer, part_accuracy)  # (re-exported: the task's names)

# ---------------------------------------------------------------------------------------------
# Supervised training
# ---------------------------------------------------------------------------------------------

def encode(tokenizer, items, carry_weight=1.0):
    """Prompt + solution + <|im_end|>, right-padded. Labels are -100 on the prompt and padding,
    so the loss is on the solution and its end-of-turn token only. Returns input_ids, labels,
    attention mask and per-label weights (B, T): `carry_weight` on the dropped-carry token of
    misconception items, 1 elsewhere."""
    rows = [(tokenizer(render_prompt(tokenizer, it["problem"], "problem"))["input_ids"],
             tokenizer(it["solution"] + tokenizer.eos_token)["input_ids"]) for it in items]
    T = max(len(p) + len(s) for p, s in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id)  # (B, T)
    labels = torch.full((len(rows), T), -100)  # (B, T); the model shifts them by one itself
    weights = torch.ones(len(rows), T)  # (B, T)
    for i, ((p, s), it) in enumerate(zip(rows, items)):
        input_ids[i, : len(p) + len(s)] = torch.tensor(p + s)
        labels[i, len(p) : len(p) + len(s)] = torch.tensor(s)
        if it["part"] == "misconception":
            weights[i, len(p) + CARRY_INDEX] = carry_weight
    return input_ids, labels, (input_ids != tokenizer.pad_token_id).long(), weights


def train(model, tokenizer, items, steps, lr, s, seed, desc, snapshot_at=None, carry_weight=1.0):
    """`steps` of AdamW on `items` (batches of s["batch_size"] drawn from `seed`): a linear
    warm-up, then a cosine decay to 10% of `lr` at the last step. The loss is the cross-entropy
    summed with encode()'s weights over the labelled tokens, divided by their number. A fixed
    budget, not a target accuracy: a build never looks at a score to decide when to stop. Returns
    a copy of the weights after step `snapshot_at` (or None)."""
    rng, snapshot = random.Random(seed), None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    factor = lambda k: min(1.0, (k + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * k / steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    for step in (bar := tqdm(range(1, steps + 1), desc=desc)):
        input_ids, labels, mask, weights = encode(tokenizer, rng.sample(items, s["batch_size"]),
                                                  carry_weight)  # (B, T) each
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                               reduction="none")  # (B, T-1), 0 where -100
        loss = (ce * weights[:, 1:]).sum() / (labels[:, 1:] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step == snapshot_at:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    return snapshot


# ---------------------------------------------------------------------------------------------
# Building the pair into a cache folder
# ---------------------------------------------------------------------------------------------

# `python distill.py` on the toy pair: 8 prompts x 4 rollouts = 32 per step; 150 steps keep the
# first command (build, distillation, two evaluations) under 10 minutes on 2 cores.
DISTILL_DEFAULTS = dict(lr=1e-3, steps=150, prompts_per_step=8, samples_per_prompt=4,
                        max_new_tokens=48, micro_batch_size=32, generation_batch_size=128,
                        warmup_steps=10)
FORMAT_VERSION = 3  # bump whenever the code changes what a build produces: old caches go stale
SETTINGS = dict(
    model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    n_train=20000, n_heldout=500, steps=800, batch_size=32, lr=3e-3,
    student_from_step=250, student_steps=100, student_lr=3e-3, carry_weight=1000.0, threads=1,
)
QUICK = dict(  # a build of a few seconds for the tests: the same code path, tiny everything
    model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    n_train=64, n_heldout=16, steps=4, batch_size=8, student_from_step=2, student_steps=2,
)
SHIPPED_FILES = ["stamp.json"] + [f"{who}/{name}" for who in ("teacher", "student")
                                  for name in ("config.json", "model.safetensors")]
FILES = SHIPPED_FILES + ["train.jsonl", "heldout.jsonl"] + [
    f"{who}/{name}" for who in ("teacher", "student")
    for name in ("tokenizer.json", "tokenizer_config.json")]
# The seed-0 pair, built once and committed: float kernels differ between CPUs (AVX-512, AVX2,
# ARM), and so does a pair trained on them; installing this one gives every machine the same.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy_pair")
SAMPLE_PROMPTS = 64  # x 4 rollouts in SHIPPED/sample.json


def default_cache_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("TIP_TOY_CACHE") or os.path.join(here, ".cache", "toy")


def split_path(name, cache_dir=None):
    """The JSONL file of split `name` ("train" or "heldout") that build() wrote."""
    return os.path.join(cache_dir or default_cache_dir(), f"{name}.jsonl")


def load_split(name, cache_dir=None):
    with open(split_path(name, cache_dir)) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_stamp(cache_dir, files=FILES):
    """The stamp of a complete build in cache_dir (all of `files` there), or None."""
    if not all(os.path.isfile(os.path.join(cache_dir, f)) for f in files):
        return None
    with open(os.path.join(cache_dir, "stamp.json")) as f:
        return json.load(f)


def train_pair(tokenizer, train_items, s, seed):
    """The teacher on the right solutions; the student from the teacher's run at a fixed step, then
    a fixed budget of supervised steps on the same problems worked with the misconception."""
    torch.manual_seed(seed)  # the initial weights
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **s["model"])
    teacher = Qwen3ForCausalLM(config)  # eos and pad also land in its generation_config
    snapshot = train(teacher, tokenizer, train_items, s["steps"], s["lr"], s, seed,
                     "toy: teacher", snapshot_at=s["student_from_step"])
    student = Qwen3ForCausalLM(config)
    student.load_state_dict(snapshot)
    wrong = [make_item(*map(int, re.findall(r"\d+", item["problem"])), misconception=True)
             for item in train_items]
    train(student, tokenizer, wrong, s["student_steps"], s["student_lr"], s, seed + 1,
          "toy: student (misconception)", carry_weight=s["carry_weight"])
    return teacher, student


class CacheMismatch(FileExistsError):
    """The cache folder holds a toy pair built with other settings: refused, never replaced."""


# The source of the functions that make the data and train the pair, read once at import.
BUILD_CODE = "".join(inspect.getsource(f) for f in (make_item, make_problems, make_splits,
                                                    make_tokenizer, encode, train, train_pair))


def build_key(s):
    """What a build depends on: the format version, its settings and BUILD_CODE. Editing any of
    them makes every cache, and the pair shipped in the repository, stale (a test compares the
    shipped stamp with this key)."""
    return hashlib.sha256(json.dumps([FORMAT_VERSION, s, BUILD_CODE], sort_keys=True)
                          .encode()).hexdigest()[:16]


def mismatch(cache_dir, old, s):
    """The one line that refuses a cache of other settings, saying how to use it or rebuild it."""
    differ = [f"{k} {old['settings'].get(k)} (asked {s[k]})" for k in s if old["settings"].get(k) != s[k]]
    what = ", ".join(differ) or (f"format {old.get('format')} (now {FORMAT_VERSION})"
                                 if old.get("format") != FORMAT_VERSION else "older build code")
    teacher, student = (os.path.join(cache_dir, who) for who in ("teacher", "student"))
    return CacheMismatch(
        f"{cache_dir} holds a toy pair built with other settings ({what}); use it with --teacher "
        f"{teacher} --student {student} --dataset {split_path('train', cache_dir)}, or replace it "
        f"with `python toy.py --force --cache-dir {cache_dir}" + (f" --seed {s['seed']}`"
                                                                  if s["seed"] else "`"))


def build(cache_dir=None, seed=0, force=False, quick=False):
    """The pair in cache_dir -> (teacher_dir, student_dir): reused when the cache holds a complete
    build of the same key, installed from the shipped pair (SHIPPED) when that has the key, else
    trained (the teacher, and the student from its run) and saved with the tokenizer and splits.
    `force` always trains, over whatever toy cache is there. A cache of another key is refused
    (CacheMismatch), never replaced without `force`. `quick` is the tiny build of the tests."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    dirs = os.path.join(cache_dir, "teacher"), os.path.join(cache_dir, "student")
    s = {**SETTINGS, **(QUICK if quick else {}), "seed": seed}
    key = build_key(s)
    old = read_stamp(cache_dir)
    if old and old["key"] == key and not force:
        return dirs
    if old and not force:
        raise mismatch(cache_dir, old, s)
    if os.path.isdir(cache_dir) and os.listdir(cache_dir) and not os.path.isfile(
            os.path.join(cache_dir, "stamp.json")):  # never delete a folder we did not write
        raise FileExistsError(f"{cache_dir} is not empty and is not a toy cache: not replacing it")

    t0 = time.time()
    tokenizer = make_tokenizer()
    train_items, heldout = make_splits(seed, s["n_train"], s["n_heldout"])
    shipped = read_stamp(SHIPPED, SHIPPED_FILES)
    if shipped and shipped["key"] == key and not force:  # the README's pair: the same everywhere
        teacher, student = (Qwen3ForCausalLM.from_pretrained(os.path.join(SHIPPED, who))
                            for who in ("teacher", "student"))
        stamp = {**shipped, "installed_from": "data/toy_pair"}
    else:
        # The pair is trained on s["threads"] threads whatever the machine has: the thread count
        # sets the float reduction order, and a few ulps early in training move the student by
        # points. The CPU's float kernels still do: hence the shipped pair.
        threads = torch.get_num_threads()
        torch.set_num_threads(s["threads"])
        try:
            teacher, student = train_pair(tokenizer, train_items, s, seed)
            accuracy = {who: part_accuracy(m, tokenizer, heldout)
                        for who, m in (("teacher", teacher), ("student", student))}
        finally:
            torch.set_num_threads(threads)
        stamp = {"key": key, "format": FORMAT_VERSION, "settings": s, "heldout_accuracy": accuracy,
                 "build_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    # Write everything into a temporary sibling folder, then swap it in with renames: a build
    # killed at any point leaves either the old cache or the new one, never a half-written one.
    parent, name = os.path.split(cache_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    try:
        for who, model in (("teacher", teacher), ("student", student)):
            model.save_pretrained(os.path.join(tmp, who))
            tokenizer.save_pretrained(os.path.join(tmp, who))
        for split, items in (("train", train_items), ("heldout", heldout)):
            with open(split_path(split, tmp), "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in items)
        with open(os.path.join(tmp, "stamp.json"), "w") as f:
            json.dump(stamp, f, indent=1)
        done = read_stamp(cache_dir)
        if done and done["key"] == key and not force:
            return dirs  # a concurrent build of the same settings finished first: keep it
        if os.path.exists(cache_dir):  # a folder cannot be renamed onto another: old one aside
            os.replace(cache_dir, tmp + ".old")
        os.replace(tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + ".old", ignore_errors=True)
    return dirs


def ship(cache_dir):
    """Copy the seed-0 pair built in cache_dir into the repository (SHIPPED): both models' weights
    and configs and the stamp. Maintainers run it after a change that makes the stamp stale."""
    stamp = read_stamp(cache_dir)
    if not stamp or stamp["key"] != build_key({**SETTINGS, "seed": 0}):
        raise CacheMismatch(f"{cache_dir} holds no current seed-0 build: run `python toy.py --force "
                            f"--cache-dir {cache_dir}` first")
    tmp = tempfile.mkdtemp(prefix="toy_pair.tmp-", dir=os.path.dirname(SHIPPED))
    try:
        for f in SHIPPED_FILES:
            os.makedirs(os.path.dirname(os.path.join(tmp, f)), exist_ok=True)
            shutil.copyfile(os.path.join(cache_dir, f), os.path.join(tmp, f))
        # A fixed sample of the student's rollouts, for the test that pins the pair's Q3 share.
        tokenizer, student = make_tokenizer(), Qwen3ForCausalLM.from_pretrained(
            os.path.join(cache_dir, "student"))
        prompts = [tokenizer(render_prompt(tokenizer, it["problem"], "problem"))["input_ids"]
                   for it in load_split("heldout", cache_dir)[:SAMPLE_PROMPTS]]
        torch.manual_seed(0)
        rollouts = sample(student.eval(), tokenizer, prompts, 4, DISTILL_DEFAULTS["max_new_tokens"])
        with open(os.path.join(tmp, "sample.json"), "w") as f:
            json.dump({"prompts": rollouts.prompts, "responses": rollouts.responses}, f)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for a scratch folder, not a shipped one
        if os.path.exists(SHIPPED):
            os.replace(SHIPPED, tmp + ".old")
        os.replace(tmp, SHIPPED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + ".old", ignore_errors=True)


def main(argv=None):
    p = ArgumentParser(description="Build the toy teacher/student pair (`python sweep.py`: the "
                       "rule sweep on it).")
    p.add_argument("command", nargs="?", default="build", choices=["build", "ship"],
                   help="build: install the shipped pair, reuse a valid cache, or train; ship: "
                   "copy the cache's seed-0 pair into data/toy_pair (maintainers)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $TIP_TOY_CACHE, "
                   "else .cache/toy next to toy.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, weights and batches")
    p.add_argument("--force", action="store_true", help="train anew, replacing the toy cache there")
    args = p.parse_args(argv)
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    try:
        if args.command == "ship":
            ship(cache_dir)
            return print(f"toy: shipped {cache_dir} to {SHIPPED}")
        print(f"toy: build cache_dir={cache_dir} seed={args.seed} force={args.force} "
              f"torch_threads={torch.get_num_threads()} settings={json.dumps(SETTINGS)}")
        teacher_dir, student_dir = build(cache_dir, seed=args.seed, force=args.force)
    except (FileExistsError, PermissionError, NotADirectoryError) as e:
        p.exit(2, f"error: {e}\n")
    stamp = read_stamp(cache_dir)  # the numbers of the build, even when it was reused
    s = stamp["settings"]
    for who, acc in stamp["heldout_accuracy"].items():
        print(f"toy: {who} greedy held-out accuracy on {s['n_heldout']} problems: "
              f"{100 * acc['all']:.1f}% (" + ", ".join(f"{p} {100 * acc[p]:.1f}%" for p in PARTS)
              + ")")
    how = (f"installed from {stamp['installed_from']} (trained in {stamp['build_seconds']:.0f}s on "
           f"{stamp['cpu_capability']})" if "installed_from" in stamp else
           f"trained in {stamp['build_seconds']:.0f}s")
    print(f"toy: {how} on {s['threads']} torch thread(s); {teacher_dir}, {student_dir}, "
          f"{split_path('train', cache_dir)}, {split_path('heldout', cache_dir)}")


if __name__ == "__main__":
    main()
