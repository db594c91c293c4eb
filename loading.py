"""Loading what a run needs: device, dtype, tokenizers, models and prompts.

The plumbing that distill.py, evaluate.py, analysis.py and toy.py share. Everything that can go wrong
here (a missing model, an unreachable hub, mismatched tokenizers, an empty or unusable dataset)
raises UsageError with one line that names the problem; the scripts print it and exit with 2.

Prompts: a message list is used as is; a plain string from a `prompt` column as is; a bare
`problem`/`question` string gets INSTRUCTION appended (reason step by step, box the answer), the
same text evaluate.py uses, so training and evaluation prompts match. Duplicate prompts are dropped
and prompts longer than `max_prompt_length` tokens are skipped and counted, never truncated.
"""
import argparse
import json
import os

import torch

from rollouts import position_ids

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_FIELDS = ("prompt", "problem", "question", "messages", "query", "instruction", "input", "Problem")


class UsageError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one (not None, not an empty list); a flag whose default
    depends on the run says so itself."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default == []
        return action.help if unset else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (`error: ...`, exit 2), not the usage block too, and
    --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=kwargs.pop("formatter_class", HelpFormatter), **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def add_model_flags(p, dtype_help="model dtype (auto: bf16 on a GPU that supports it)"):
    """--device, --dtype and --trust-remote-code, as every script that loads a model takes them."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype_help)
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repo code")


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


# The statistics and the loss take logits as hidden @ Wᵀ, projecting only the positions they need
# (tip.py). A head that adds a bias, scales its logits or soft-caps them would be mis-scored
# silently, so such a model is refused; these config names are the ones transformers models use.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def hidden_states(model, input_ids, attention_mask):
    """Final-layer hidden states of the backbone, without the lm_head. (B, L) -> (B, L, D)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


def lm_head(model):
    """The output projection weight (V, D); tied to the embeddings in small Qwen3 models."""
    return model.get_output_embeddings().weight


@torch.no_grad()
def check_output_head(model, name):
    """Refuse a model whose logits are not hidden_states @ lm_head.weightᵀ, with one line.

    Three checks: the head has no bias; the config names no logit transform with a non-trivial
    value; and on a few tokens the model's own logits equal the projection (catches the rest).
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise UsageError(f"model {name!r} has no output embedding (lm_head) weight to project with")
    if getattr(head, "bias", None) is not None:
        raise UsageError(f"model {name!r}: its lm_head has a bias; TIP's statistics and loss "
                         "assume logits = hidden @ Wᵀ and would mis-score it")
    config = model.config.get_text_config()
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            raise UsageError(f"model {name!r}: config {key}={value} transforms the logits; TIP's "
                             "statistics and loss assume logits = hidden @ Wᵀ and would mis-score it")
    device = head.weight.device
    ids = torch.arange(1, min(9, head.weight.shape[0]), device=device)[None]  # (1, 8)
    attn = torch.ones_like(ids)  # (1, 8)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits.float()
    projected = hidden_states(model, ids, attn).float() @ head.weight.float().T  # (1, 8, V)
    scale = projected.abs().max().clamp_min(1e-6)
    if (logits - projected).abs().max() > 2e-2 * scale:
        raise UsageError(f"model {name!r}: its logits differ from hidden @ lm_head.weightᵀ (by "
                         f"{(logits - projected).abs().max():.3g}); TIP's statistics and loss would "
                         "mis-score it")


def check_same_tokenizer(teacher_tok, student_tok):
    """Teacher and student must map text to the same ids; refuse clearly otherwise."""
    vt, vs = teacher_tok.get_vocab(), student_tok.get_vocab()
    if vt != vs:
        diff = sorted(set(vt.items()) ^ set(vs.items()), key=lambda kv: kv[1])[:1]
        raise UsageError(f"teacher and student tokenizers differ ({len(vt)} vs {len(vs)} tokens; "
                         f"first difference {diff}): OPD scores the student's token ids with the "
                         "teacher, so both must share one tokenizer")


def check_context(models, needed, why, trust_remote_code=False):
    """Refuse, before anything is generated, a model whose context (its config's
    max_position_embeddings) cannot hold `needed` positions. `models`: (flag, name) pairs; `why`
    names the settings that ask for them. A config that states no context passes."""
    from transformers import AutoConfig
    for flag, name in models:
        held = getattr(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code),
                       "max_position_embeddings", None)
        if held is not None and held < needed:
            raise UsageError(f"{flag} {name!r} holds {held} positions, but this run needs {needed} "
                             f"({why}): lower them, or choose a model with a longer context")


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


def prompt_order(n, step, per_step, seed):
    """Indices of the prompts of `step` (0-based). Epoch e is the (e+1)-th permutation drawn from
    one generator seeded with `seed`, so seeds and epochs never share a stream, and the data
    position is a function of the step alone: a resumed run sees the same prompts."""
    generator, perms = torch.Generator().manual_seed(seed), []
    for j in range(step * per_step, (step + 1) * per_step):
        while len(perms) <= j // n:
            perms.append(torch.randperm(n, generator=generator))
        yield int(perms[j // n][j % n])


def looks_like_path(name):
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def check_pair(teacher, student):
    """Both --teacher and --student, or neither (the laptop pair); a local one must be a folder."""
    if (teacher is None) != (student is None):
        raise UsageError("give both --teacher and --student, or neither (the laptop pair)")
    for who, name in (("teacher", teacher), ("student", student)):
        if name and looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise UsageError(f"--{who} {name!r} is not a directory (a local model is a folder "
                             "written by save_pretrained)")


def check_writable(path, flag="--output-dir"):
    """Raise UsageError unless `path` exists as a writable folder or could be created."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path!r} is not writable ({parent})")
