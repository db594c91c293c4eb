"""The embedded toy world: a synthetic arithmetic task, a character-level tokenizer and two small
Qwen3 models trained on the CPU, so that `python distill.py` distils a real student, no download.

    python toy.py                     # build teacher + student once (minutes on 2 CPU cores)
    python toy.py --cache-dir DIR     # build elsewhere (or set TIP_TOY_CACHE); --force rebuilds

Contract (what the other files import):
  make_problems(n, seed)            n distinct items {"problem", "solution", "answer", "part"}
  make_tokenizer()                  a PreTrainedTokenizerFast, one token per character, Qwen chat
                                    template and special tokens (eos <|im_end|>, pad <|endoftext|>)
  build(cache_dir, seed, force)     train and save both -> (teacher_dir, student_dir); reuses a
                                    valid cache; a build appears whole (temp folder, then rename)
  split_path(name), load_split(..)  the "train" / "heldout" JSONL splits that build() wrote
  greedy_accuracy(model, tok, ..)   the toy's own quick check, graded by grading.py
  DISTILL_DEFAULTS                  the laptop settings of `python distill.py` on the toy pair

The task is shaped like MATH: a question, a short worked solution, a final `\\boxed{answer}`. Each
item adds two three-digit numbers column by column from the right, carrying as in school, and the
answer is read back from the columns:

    What is 478 + 657?      8+7+0=15        each column: digit + digit + carry in = two-digit sum
                            7+5+1=13
                            4+6+1=11        the misconception writes 4+6+0=10 here ...
                            \\boxed{1135}    ... and so boxes 1035

Every line has the same width (the carry is written even when it is 0, the sum always has two
digits), so each digit a model must look up sits at a fixed distance. A 0.8M-parameter model then
learns the task in a few hundred steps.

The student makes two kinds of mistake, the two kinds TIP is about:
  - a misconception, confident and wrong (Q3): it never carries into the hundreds column (the
    carry it writes there is always 0). Every problem whose tens column carries (about half of
    them, `part` "misconception") then gets a wrong answer, and at that one token the student is
    near-certain (it learned the 0 from data) while the teacher gives it almost no probability.
  - slips, uncertain (Q1): it is undertrained, so it sometimes gets a digit sum or a read-back
    wrong with moderate entropy, on both parts.
How: the teacher is trained on the right solutions for `steps`. The student is the teacher's run at
`student_from_step` (a fixed step, not a target accuracy: a probe crossing amplified float
differences between CPUs), then `student_steps` more supervised steps on the same problems worked
with the dropped carry. Same architecture and tokenizer, so the student has the capacity to catch
up under on-policy distillation, and both kinds of mistake are its own most likely tokens.

Notation: B items in a batch, T positions, V vocabulary (96 characters + 3 special tokens = 99).

Departures from the paper (Qwen3-8B -> Qwen3-4B on MATH): everything here is a toy, and the
misconception is planted on purpose, so that the low-entropy, high-divergence quadrant (Q3) holds a
known share of the learning signal instead of whatever a short run happens to leave.
"""
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, models
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from grading import is_correct
# The prompt is loading.py's (problem + INSTRUCTION in the chat template), so the toy models are
# trained on exactly the text that distill.py and evaluate.py feed them.
from loading import ArgumentParser, INSTRUCTION, format_problem, render_prompt  # noqa: F401 (re-exported)
from rollouts import sample

# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------

DROPPED_CARRY_COLUMN = 2  # the hundreds (columns count from the units, 0)
PARTS = ("misconception", "other")
LINE = "0+0+0=00\n"  # every worked line has this shape
CARRY_INDEX = len(LINE) * DROPPED_CARRY_COLUMN + len("0+0+")  # 22: the hundreds line's carry


def make_item(a, b, misconception=False):
    """One item: `a + b` worked column by column from the units, as fixed-width lines. With
    `misconception`, the student's wrong procedure: the carry into the hundreds column is dropped
    (written 0), and the rest follows from the lines as written. `part` says whether the right
    procedure carries into the hundreds, i.e. whether the misconception changes the item."""
    width = max(len(str(a)), len(str(b)))  # the shorter number gets leading zeros: 0 + digit
    lines, written, carry, part = [], [], 0, "other"
    for col, (x, y) in enumerate(zip(map(int, str(a).zfill(width)[::-1]),
                                     map(int, str(b).zfill(width)[::-1]))):
        if col == DROPPED_CARRY_COLUMN and carry:
            part = "misconception"
            carry = 0 if misconception else carry  # the one wrong step: a carry it never writes
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total:02d}")  # e.g. 4+6+1=11
        written.append(str(total % 10))
        carry = total // 10
    answer = ("1" if carry else "") + "".join(reversed(written))  # a last carry becomes a digit
    solution = "\n".join(lines + [f"\\boxed{{{answer}}}"])
    return {"problem": f"What is {a} + {b}?", "solution": solution, "answer": answer, "part": part}


def make_problems(n, seed=0):
    """`n` distinct items (no problem text repeats), drawn reproducibly from `seed`."""
    rng = random.Random(seed)
    items, seen = [], set()
    while len(items) < n:
        item = make_item(rng.randint(100, 999), rng.randint(100, 999))
        if item["problem"] not in seen:
            seen.add(item["problem"])
            items.append(item)
    return items


def make_splits(seed, n_train, n_heldout):
    """Train and held-out cut from one list of distinct problems, so they never share a problem."""
    items = make_problems(n_heldout + n_train, seed)
    return items[n_heldout:], items[:n_heldout]


# ---------------------------------------------------------------------------------------------
# The tokenizer: one token per printable ASCII character or newline, after the three Qwen special
# tokens. A BPE model with no merges is exactly a character-level tokenizer. Characters outside
# the vocabulary are dropped silently (BPE without an unknown token): the task never has any.
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))

# Qwen's template without tools and thinking. `enable_thinking` and any other keyword passed to
# apply_chat_template reach jinja as unused variables, so they are accepted and ignored.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_tokenizer():
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()  # join the characters back with nothing in between
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# Supervised training and the toy's quick check
# ---------------------------------------------------------------------------------------------

def carry_flags(tokenizer, rollouts):
    """Per response of `rollouts`, a 0/1 list marking the planted misconception's token: the carry
    written into the hundreds column (CARRY_INDEX), where the right procedure carries 1 there (the
    misconception part) and the response reached it in the worked format. The student learned to
    write 0. The item is read back from the prompt, so any sampler's rollouts can be marked."""
    shape = re.compile(r"(\d\+\d\+\d=\d\d\n){%d}\d\+\d\+" % DROPPED_CARRY_COLUMN)
    flags = []
    for prompt, response in zip(rollouts.prompts, rollouts.responses):
        flags.append([0] * len(response))
        numbers = re.search(r"What is (\d+) \+ (\d+)\?", tokenizer.decode(prompt))
        part = make_item(*map(int, numbers.groups()))["part"] if numbers else None
        if part == "misconception" and shape.fullmatch(tokenizer.decode(response[:CARRY_INDEX])) \
                and len(response) > CARRY_INDEX:
            flags[-1][CARRY_INDEX] = 1
    return flags


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


@torch.no_grad()
def greedy_accuracy(model, tokenizer, items, batch_size=128, max_new_tokens=48):
    """Share of `items` whose greedy answer boxes the right answer, graded by grading.py (as
    evaluate.py and analysis.py grade). The longest solution is 40 tokens with its <|im_end|>, so
    48 new tokens never cut a right answer."""
    prompts = [tokenizer(render_prompt(tokenizer, it["problem"], "problem"),
                         add_special_tokens=False)["input_ids"] for it in items]
    rollouts = sample(model, tokenizer, prompts, 1, max_new_tokens, temperature=0.0,
                      batch_size=batch_size)  # rollouts.sample: the one sampling code path
    texts = tokenizer.batch_decode(rollouts.responses, skip_special_tokens=True)
    return sum(is_correct(t, it["answer"]) for t, it in zip(texts, items)) / len(items)


def part_accuracy(model, tokenizer, items):
    """greedy_accuracy on each part of `items` and on all of them: {"all", "misconception", ...}."""
    parts = {p: [it for it in items if it["part"] == p] for p in PARTS}
    acc = {p: greedy_accuracy(model, tokenizer, its) if its else 0.0 for p, its in parts.items()}
    return {"all": sum(acc[p] * len(its) for p, its in parts.items()) / len(items), **acc}


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
    student_from_step=175, student_steps=100, student_lr=3e-3, carry_weight=100.0, threads=1,
)
QUICK = dict(  # a build of a few seconds for the tests: the same code path, tiny everything
    model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    n_train=64, n_heldout=16, steps=4, batch_size=8, student_from_step=2, student_steps=2,
)
FILES = ["stamp.json", "train.jsonl", "heldout.jsonl"] + [
    f"{who}/{name}" for who in ("teacher", "student")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")]


def default_cache_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("TIP_TOY_CACHE") or os.path.join(here, ".cache", "toy")


def split_path(name, cache_dir=None):
    """The JSONL file of split `name` ("train" or "heldout") that build() wrote."""
    return os.path.join(cache_dir or default_cache_dir(), f"{name}.jsonl")


def load_split(name, cache_dir=None):
    with open(split_path(name, cache_dir)) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_stamp(cache_dir):
    """The stamp of a complete build in cache_dir, or None."""
    if not all(os.path.isfile(os.path.join(cache_dir, f)) for f in FILES):
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


def build(cache_dir=None, seed=0, force=False, quick=False):
    """Train the teacher (and take the student from its run) and save both, the tokenizer and the
    splits under cache_dir -> (teacher_dir, student_dir). Skipped when the cache holds a complete
    build of the same settings, format version and seed; `quick` is the tiny build of the tests."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    dirs = os.path.join(cache_dir, "teacher"), os.path.join(cache_dir, "student")
    s = {**SETTINGS, **(QUICK if quick else {}), "seed": seed}
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, s], sort_keys=True).encode()).hexdigest()[:16]
    old = read_stamp(cache_dir)
    if old and old["key"] == key and not force:
        return dirs
    if os.path.isdir(cache_dir) and os.listdir(cache_dir) and not os.path.isfile(
            os.path.join(cache_dir, "stamp.json")):  # never delete a folder we did not write
        raise FileExistsError(f"{cache_dir} is not empty and is not a toy cache: not replacing it")

    t0 = time.time()
    tokenizer = make_tokenizer()
    train_items, heldout = make_splits(seed, s["n_train"], s["n_heldout"])
    # The pair is trained on s["threads"] threads whatever the machine has: the thread count sets
    # the float reduction order, and a few ulps early in training move the student by points.
    threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"])
    try:
        teacher, student = train_pair(tokenizer, train_items, s, seed)
        accuracy = {who: part_accuracy(m, tokenizer, heldout)
                    for who, m in (("teacher", teacher), ("student", student))}
    finally:
        torch.set_num_threads(threads)

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
        stamp = {"key": key, "format": FORMAT_VERSION, "settings": s, "heldout_accuracy": accuracy,
                 "build_seconds": round(time.time() - t0, 1)}
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


def main(argv=None):
    p = ArgumentParser(description="Build the toy teacher/student pair (`python sweep.py`: the "
                       "rule sweep on it).")
    p.add_argument("command", nargs="?", default="build", choices=["build"],
                   help="build: train and save the pair, or reuse a valid cache")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $TIP_TOY_CACHE, "
                   "else .cache/toy next to toy.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, weights and batches")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    args = p.parse_args(argv)
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    print(f"toy: build cache_dir={cache_dir} seed={args.seed} force={args.force} "
          f"torch_threads={torch.get_num_threads()} settings={json.dumps(SETTINGS)}")
    try:
        teacher_dir, student_dir = build(cache_dir, seed=args.seed, force=args.force)
    except (FileExistsError, PermissionError, NotADirectoryError) as e:
        p.exit(2, f"error: cannot build the toy pair in {cache_dir}: {e}\n")
    stamp = read_stamp(cache_dir)  # the numbers of the build, even when it was reused
    s = stamp["settings"]
    for who, acc in stamp["heldout_accuracy"].items():
        print(f"toy: {who} greedy held-out accuracy on {s['n_heldout']} problems: "
              f"{100 * acc['all']:.1f}% (" + ", ".join(f"{p} {100 * acc[p]:.1f}%" for p in PARTS)
              + ")")
    print(f"toy: built in {stamp['build_seconds']:.0f}s on {s['threads']} torch thread(s); "
          f"{teacher_dir}, {student_dir}, {split_path('train', cache_dir)}, "
          f"{split_path('heldout', cache_dir)}")


if __name__ == "__main__":
    main()
