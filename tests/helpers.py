"""Tiny local models and files for the tests: nothing is downloaded, everything loads through
`from_pretrained` from a temporary directory, as a real checkpoint would.

    make_tokenizer()                     toy.py's character-level tokenizer with Qwen's
                                         <|im_start|>, <|im_end|> (eos) and <|endoftext|> (pad)
    make_tiny_pair(tmp_path)             random-init Qwen3ForCausalLM teacher and student saved with
                                         the tokenizer -> (teacher_dir, student_dir)
    make_tool_tokenizer(texts)           a byte-level BPE tokenizer trained on `texts`, with
                                         Qwen3's special tokens and its tool-use chat template
    make_tool_pair(tmp_path, texts)      teacher and student with that tokenizer, long contexts
    write_jsonl(path, rows)              one JSON object per line
"""
import json
import os

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from toy import make_tokenizer  # noqa: F401 (the toy's tokenizer and chat template, re-exported)

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                 "<tool_response>", "</tool_response>", "<think>", "</think>"]

def make_model(tokenizer, layers, hidden_size, seed, extra_rows=0, max_positions=512):
    """A random-init Qwen3ForCausalLM; `extra_rows` pads the lm_head past the tokenizer, as
    Qwen2.5's larger sizes do (152,064 rows for 151,665 tokens)."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer) + extra_rows, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    return Qwen3ForCausalLM(config)


def make_tiny_pair(tmp_path, teacher_layers=2, student_layers=1):
    """Random-init teacher (hidden 48) and student (hidden 32) sharing one tokenizer, each saved
    with it under tmp_path. The hidden sizes differ on purpose: code must not assume D_t == D_s."""
    tokenizer = make_tokenizer()
    dirs = []
    for name, layers, hidden, seed in (("teacher", teacher_layers, 48, 0),
                                       ("student", student_layers, 32, 1)):
        path = os.path.join(str(tmp_path), name)
        make_model(tokenizer, layers, hidden, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return tuple(dirs)


def make_tool_tokenizer(texts, vocab_size=3000):
    """A byte-level BPE tokenizer trained on `texts` (a second), so that DeepPlanning's ~24k-char
    prompt is ~6k tokens, with Qwen3's tool tokens as single special tokens and the Qwen3 chat
    template (tests/fixtures/qwen3_chat_template.jinja, verbatim)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = open(os.path.join(HERE, "fixtures", "qwen3_chat_template.jinja")).read()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=QWEN3_SPECIAL[1:],
                                   chat_template=template, clean_up_tokenization_spaces=False)


def make_tool_pair(tmp_path, texts):
    """Random-init teacher and student with make_tool_tokenizer(texts), contexts of 16k tokens."""
    tokenizer = make_tool_tokenizer(texts)
    dirs = []
    for name, layers, hidden, seed in (("teacher", 1, 32, 0), ("student", 1, 16, 1)):
        model = make_model(tokenizer, layers, hidden, seed, max_positions=16384)
        path = os.path.join(str(tmp_path), name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return tuple(dirs)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def fp32_loss_tolerance(n_tokens, vocab):
    """Absolute error to expect of a sum of n per-token divergences computed in fp32 (two such
    paths differ by up to twice this). Each is a probability-weighted sum of log-probabilities of
    size up to about log V, each carrying a rounding error of about eps·log V from its
    log-softmax; allow 4 such errors per token (both models, the difference, the sum)."""
    import math
    import torch
    return 4 * n_tokens * torch.finfo(torch.float32).eps * math.log(vocab)
