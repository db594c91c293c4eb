"""rollouts.run_episodes: multi-turn tool use built by appending ids, the student's tokens masked 1
and everything else 0; a training step on episodes scores only the student's tokens."""
import json
import os

import pytest
import torch

import opd_step
import rollouts
from helpers import make_model, make_tokenizer
from rollouts import as_rollouts, collate, pad_id, parse_tool_calls, run_episodes

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN3_TEMPLATE = open(os.path.join(HERE, "fixtures", "qwen3_chat_template.jinja")).read()
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look a city up",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "lookup", "arguments": {"city": "Rome"}}\n</tool_call>'
ANSWER = "<plan>Day 1: Rome</plan>"


def qwen3_tokenizer():
    """The toy's character-level tokenizer with the Qwen3 chat template (hermes tool format)."""
    tok = make_tokenizer()
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def scripted(tok, turns):
    """Stands in for rollouts.generate: the next scripted turn for each sequence, with <|im_end|>."""
    script = iter(turns)

    def generate(model, prompts, config, pad):
        return [tok(next(script) + "<|im_end|>", add_special_tokens=False)["input_ids"] + [pad] * 3
                for _ in prompts]
    return generate


def test_tool_calls_are_parsed_and_bad_ones_kept_for_the_tool_to_answer():
    text = CALL + '\n<tool_call>\n{"name": "lookup", "arguments": {"city": \n</tool_call>'
    assert parse_tool_calls(text) == [("lookup", {"city": "Rome"}),
                                      ("lookup", '\n{"name": "lookup", "arguments": {"city": \n')]
    assert parse_tool_calls("<tool_call>[1, 2]</tool_call>") == [("", "[1, 2]")]
    assert parse_tool_calls("no call") == []


@pytest.mark.parametrize("thinking", [False, True])
def test_an_episode_masks_exactly_the_students_tokens(monkeypatch, thinking):
    tok = qwen3_tokenizer()
    model = make_model(tok, 1, 16, seed=0)
    messages = [{"role": "system", "content": "plan trips"}, {"role": "user", "content": "Rome?"}]
    prompt = tok(tok.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking),
                 add_special_tokens=False)["input_ids"]
    seen = []

    def lookup(name, arguments):
        seen.append((name, arguments))
        return json.dumps({"city": arguments["city"], "hotels": 2})
    first = ("<think>\nfind hotels\n</think>\n\n" if thinking else "") + CALL
    monkeypatch.setattr(rollouts, "generate", scripted(tok, [first, ANSWER]))
    [e] = run_episodes(model, tok, [prompt], [lookup], enable_thinking=thinking)
    assert seen == [("lookup", {"city": "Rome"})] and e.turns == 2 and e.tool_calls == 1
    assert e.final == ANSWER and not e.truncated
    turn1 = tok(first + "<|im_end|>", add_special_tokens=False)["input_ids"]
    turn2 = tok(ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
    between = ("\n<|im_start|>user\n<tool_response>\n" + json.dumps({"city": "Rome", "hotels": 2})
               + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
               + ("" if thinking else "<think>\n\n</think>\n\n"))
    gap = tok(between, add_special_tokens=False)["input_ids"]
    assert e.response == turn1 + gap + turn2  # ids appended turn by turn, nothing re-rendered
    assert e.mask == [1] * len(turn1) + [0] * len(gap) + [1] * len(turn2)  # token by token
    # the ids the teacher will read are the prompt and exactly these ids
    r = as_rollouts([e])
    ids, _, loss_mask = collate(r.prompts, r.responses, pad_id(tok), r.masks)
    assert ids[0].tolist() == prompt + e.response
    predicted = ids[0, 1:][loss_mask[0, :-1]].tolist()  # the tokens the loss positions predict
    assert predicted == turn1 + turn2


def test_limits_cut_an_episode_and_mark_it_truncated(monkeypatch):
    tok = qwen3_tokenizer()
    model = make_model(tok, 1, 16, seed=0)
    prompt = tok("<|im_start|>user\nRome?<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    answer = lambda name, arguments: "{}"  # noqa: E731
    monkeypatch.setattr(rollouts, "generate", scripted(tok, [CALL] * 3))
    [e] = run_episodes(model, tok, [prompt], [answer], max_turns=3)
    assert e.turns == 3 and e.tool_calls == 2 and e.truncated and e.final == ""
    monkeypatch.setattr(rollouts, "generate", scripted(tok, [CALL]))
    [e] = run_episodes(model, tok, [prompt], [answer], max_total_tokens=len(prompt) + 20)
    assert e.truncated and len(prompt) + len(e.response) == len(prompt) + 20 and set(e.mask) == {1}


def test_a_training_step_on_episodes_touches_only_generated_positions(monkeypatch):
    tok = qwen3_tokenizer()
    teacher = make_model(tok, 2, 24, seed=1).eval().requires_grad_(False)
    student = make_model(tok, 1, 16, seed=2)
    prompt = tok("<|im_start|>user\nRome?<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(rollouts, "generate", scripted(tok, [CALL, ANSWER, CALL, CALL, ANSWER]))
    episodes = run_episodes(student, tok, [prompt, prompt], [lambda n, a: '{"ok": 1}'] * 2)
    batch = as_rollouts(episodes)
    captured = {}
    real = opd_step.hidden_states

    def spy(model, ids, attn):
        h = real(model, ids, attn)
        if model is student:
            h.register_hook(lambda g: captured.setdefault("grads", []).append(g))
        return h
    monkeypatch.setattr(opd_step, "hidden_states", spy)
    cfg = opd_step.StepSettings(rule="all", keep=1.0, loss="reverse_kl", beta=0.5,
                                     importance_weights=False, micro_batch_size=2, micro_batch_tokens=10**6, chunk_size=7,
                                     dtype=torch.float32, pad_id=pad_id(tok))
    metrics = opd_step.opd_step(student, teacher, batch, cfg, torch.Generator().manual_seed(0), {})
    parts = rollouts.micro_batches(batch, cfg.micro_batch_size, cfg.micro_batch_tokens)
    assert metrics["response_tokens"] == sum(map(sum, batch.masks))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["loss"] > 0
    assert len(captured["grads"]) == len(parts)  # one backward per micro-batch, in their order
    for part, g in zip(parts, captured["grads"]):
        _, _, loss_mask = collate(part.prompts, part.responses, pad_id(tok), part.masks, align=False)
        grad = g.abs().sum(-1)  # (b, L): gradient reaching each position's hidden state
        assert (grad[~loss_mask] == 0).all() and (grad[loss_mask] > 0).all()
