"""Tiny local models and files for the tests: nothing is downloaded, everything loads through
`from_pretrained` from a temporary directory, as a real checkpoint would.

    make_tokenizer()                     a character-level PreTrainedTokenizerFast with Qwen's
                                         <|im_start|>, <|im_end|> (eos) and <|endoftext|> (pad)
    make_tiny_pair(tmp_path)             random-init Qwen3ForCausalLM teacher and student saved with
                                         the tokenizer -> (teacher_dir, student_dir)
    write_jsonl(path, rows)              one JSON object per line
"""
import json
import os
import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = "\n" + string.printable[:95]  # newline + printable ASCII (letters, digits, punctuation)

# Qwen's chat template without tools and thinking; `enable_thinking` is accepted and ignored.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_tokenizer(vocab_chars=CHARS):
    """One token per character of `vocab_chars` after the three special tokens (ids 0, 1, 2).
    A BPE model with no merges is exactly a character-level tokenizer."""
    chars = list(dict.fromkeys(vocab_chars))  # unique, order kept
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()  # join the characters back with nothing in between
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def make_model(tokenizer, layers, hidden_size, seed, extra_rows=0):
    """A random-init Qwen3ForCausalLM; `extra_rows` pads the lm_head past the tokenizer, as
    Qwen2.5's larger sizes do (152,064 rows for 151,665 tokens)."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer) + extra_rows, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    return Qwen3ForCausalLM(config)


def make_tiny_pair(tmp_path, vocab_chars=CHARS, teacher_layers=2, student_layers=1):
    """Random-init teacher (hidden 48) and student (hidden 32) sharing one tokenizer, each saved
    with it under tmp_path. The hidden sizes differ on purpose: code must not assume D_t == D_s."""
    tokenizer = make_tokenizer(vocab_chars)
    dirs = []
    for name, layers, hidden, seed in (("teacher", teacher_layers, 48, 0),
                                       ("student", student_layers, 32, 1)):
        path = os.path.join(str(tmp_path), name)
        make_model(tokenizer, layers, hidden, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return tuple(dirs)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)
