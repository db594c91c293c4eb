"""The toy task: column addition shaped like MATH, with a planted misconception, and its
character-level tokenizer. toy.py trains the teacher/student pair on it.

Contract:
  make_item(a, b, misconception)    one item {"problem", "solution", "answer", "part"}
  make_problems(n, seed)            n distinct items; make_splits(seed, ..) train and held-out
  make_tokenizer()                  a PreTrainedTokenizerFast, one token per character, Qwen chat
                                    template and special tokens (eos <|im_end|>, pad <|endoftext|>)
  carry_flags(tokenizer, rollouts)  the planted misconception's token in each response (0/1 lists)
  greedy_accuracy(model, tok, ..)   the toy's own quick check; evaluate.py does the real grading

Each item adds two three-digit numbers column by column from the right, carrying as in school, and
the answer is read back from the columns:

    What is 478 + 657?      8+7+0=15        each column: digit + digit + carry in = two-digit sum
                            7+5+1=13
                            4+6+1=11        the misconception writes 4+6+0=10 here ...
                            \\boxed{1135}    ... and so boxes 1035

Every line has the same width (the carry is written even when it is 0, the sum always has two
digits), so each digit a model must look up sits at a fixed distance, and the hundreds column's
carry is always response token CARRY_INDEX (22). A 0.8M-parameter model learns the task in a few
hundred steps.

The student makes two kinds of mistake, the two kinds TIP is about:
  - a misconception, confident and wrong (Q3): it never carries into the hundreds column (the
    carry it writes there is always 0). Every problem whose tens column carries (about half of
    them, `part` "misconception") then gets a wrong answer, and at that one token the student is
    near-certain while the teacher gives it almost no probability.
  - slips, uncertain (Q1): it is undertrained, so it sometimes gets a digit sum or a read-back
    wrong with moderate entropy, on both parts.

Notation: B items, T positions, V vocabulary (96 characters + 3 special tokens = 99).

Departures from the paper (Qwen3-8B -> Qwen3-4B on MATH): everything here is a toy, and the
misconception is planted on purpose, so that the low-entropy, high-divergence quadrant (Q3) holds a
known share of the learning signal instead of whatever a short run happens to leave.
"""
import random
import re

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

# The prompt is loading.py's (problem + INSTRUCTION in the chat template), so the toy models are
# trained on exactly the text that distill.py and evaluate.py feed them.
from grading import is_correct
from loading import render_prompt
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
# The planted misconception's token, and the toy's quick check
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

