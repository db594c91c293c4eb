"""Rollouts: the one place where prompts become the token ids a student is trained on.

    sample(model, tokenizer, prompts, ...)   -> Rollouts: student samples, cut after the first EOS
    run_episodes(model, tokenizer, prompts, tools, ...) -> Episodes: multi-turn tool use
    as_rollouts(episodes)                    -> Rollouts whose masks mark the student's own tokens
    collate(prompts, responses, pad, masks)  -> input_ids, attention_mask, loss_mask (B, L)
    micro_batches(rollouts, max_rollouts, max_tokens) -> Rollouts parts, cut by a token budget
    position_ids(attention_mask)             positions that skip left padding

Sampling is exact: a rollout is drawn from P_S = softmax(z / T) (nucleus-truncated only if top_p < 1),
the distribution the loss is taken under (docs/method.md, "Sampling"). transformers fills every
generation setting left unset from the checkpoint's own `generation_config` (Qwen3 ships top_k 20
and T 0.6, Qwen2.5 instruct a repetition penalty of 1.05-1.1), so `sample` hides that config from
`generate` for the call: nothing a checkpoint ships reaches a rollout. The evaluator and the toy's
accuracy check sample through the same function.

An episode (agentic tasks) is built by appending token ids turn by turn: the student samples one
assistant turn; the tool calls in it run; their answers, as the chat template renders them, are
appended; the student continues from there. The conversation is never re-rendered (a template
re-formats earlier turns, so re-rendering would change the ids the student sampled), so the teacher
later scores exactly the student's ids, and each id carries a mask: 1 where the student generated
it, 0 for tool results and the template text between turns.

Notation: B rollouts, L sequence positions (prompt + response, padded).
"""
import contextlib
import dataclasses
import json
import re

import torch

from parallel import all_reduce_max, distributed


@dataclasses.dataclass
class Rollouts:
    prompts: list    # token ids of the prompt of each rollout
    responses: list  # token ids after the prompt, cut after the first EOS (the EOS kept)
    masks: list = None  # per response token: 1 if the student generated it, 0 if not (None: all 1)
    truncated: list = None  # per rollout: stopped by a length limit before its end (None: unknown)
    # Token groups a task asks to follow through training (distill logs where they sit and what
    # the rule kept): name -> per response token 1 if in the group. The toy: {"toy/carry": ...}.
    followed: dict = None


def stop_ids(model, tokenizer):
    """Every id that ends a rollout: the tokenizer's EOS and the model's generation EOS list."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(prompts, responses, pad, masks=None, align=True):
    """Pad B rollouts into one batch. align=True: left-pad prompts so every response starts at the
    same column P, right-pad responses (what analysis.py reads). align=False: left-pad each whole
    sequence, the least padding (training: opd_step.opd_step).

    Returns input_ids (B, L), attention_mask (B, L) and loss_mask (B, L): True at the positions
    whose hidden state predicts a trained response token (index i-1 for the token at index i).
    `masks` (one 0/1 list per response) leaves out response tokens the student did not generate.
    """
    P = max(len(p) for p in prompts) if align else 0
    L = max(P + max(max(len(r) for r in responses), 1),
            0 if align else max(len(p) + len(r) for p, r in zip(prompts, responses)))
    input_ids = torch.full((len(prompts), L), pad, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros(len(prompts), L, dtype=torch.long)  # (B, L)
    loss_mask = torch.zeros(len(prompts), L, dtype=torch.bool)  # (B, L)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        start = P - len(p) if align else L - len(p) - len(r)  # first prompt column
        input_ids[b, start:start + len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[b, start:start + len(p) + len(r)] = 1
        trained = torch.tensor(masks[b], dtype=torch.bool) if masks is not None else True
        first = start + len(p) - 1  # the position that predicts the first response token
        loss_mask[b, first:first + len(r)] = trained
    return input_ids, attention_mask, loss_mask


def padded_tokens(prompts, responses):
    """Positions that collate(..., align=False) computes: B × the longest prompt + response."""
    return len(prompts) * max(max(len(p) + len(r) for p, r in zip(prompts, responses)), 1)


def micro_batches(rollouts, max_rollouts, max_tokens, max_padding=1.1):
    """The step's rollouts as micro-batches (Rollouts each), for collate(..., align=False): at most
    `max_rollouts` rollouts and `max_tokens` padded positions (padded_tokens) each, and padded
    positions at most `max_padding` × real ones (so over the whole step too).

    A step within both limits is one micro-batch, as it comes: ĥ and δ̂ are then normalised over
    the whole step, as in the paper. Otherwise rollouts are sorted by length, longest first, and
    cut greedily where the next one would break a limit, so each micro-batch holds rollouts of
    similar length; a rollout longer than `max_tokens` is a micro-batch of its own. Inside a
    micro-batch they keep their order in the step. The step's gradient does not depend on the cut
    (opd_step.opd_step divides the summed loss once); only the per-micro-batch normalisation of ĥ,
    δ̂ does (docs/method.md).
    """
    length = [len(p) + len(r) for p, r in zip(rollouts.prompts, rollouts.responses)]
    parts, current = [], []
    if 0 < len(length) <= max_rollouts and len(length) * max(length) <= max_tokens:
        parts, length = [list(range(len(length)))], []  # one micro-batch: nothing to sort
    for i in sorted(range(len(length)), key=lambda i: -length[i]):
        padded = (len(current) + 1) * length[current[0] if current else i]  # the first is longest
        if current and (len(current) + 1 > max_rollouts or padded > max_tokens
                        or padded > max_padding * (sum(length[j] for j in current) + length[i])):
            parts.append(current)
            current = []
        current.append(i)
    parts += [current] if current else []
    # Under torchrun every rank must make the same number of passes (FSDP's collectives): a rank
    # with fewer micro-batches halves its largest ones (each rank has the same number of rollouts).
    for _ in range(int(all_reduce_max(len(parts))) - len(parts)):
        big = parts.pop(max(range(len(parts)), key=lambda k: len(parts[k])))
        parts += [big[:len(big) // 2], big[len(big) // 2:]]
    pick = lambda items, idx: [items[j] for j in sorted(idx)] if items is not None else None  # noqa: E731
    return [Rollouts(pick(rollouts.prompts, idx), pick(rollouts.responses, idx),
                     pick(rollouts.masks, idx), pick(rollouts.truncated, idx),
                     {k: pick(v, idx) for k, v in (rollouts.followed or {}).items()} or None)
            for idx in parts]


def position_ids(attention_mask):
    """Positions that skip left padding, as `generate` computes them. (B, L) -> (B, L)."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


@contextlib.contextmanager
def checkpoint_settings_hidden(model):
    """Give `model` a blank generation config for the duration: generate() then has nothing of the
    checkpoint's (penalties, top-k, n-gram bans, ...) to fill unset settings from."""
    from transformers import GenerationConfig
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def generation_config(max_new_tokens, temperature, top_p, stops, pad):
    """Plain ancestral sampling from softmax(z / T), top-p if < 1 (or greedy when T = 0)."""
    from transformers import GenerationConfig
    sampling = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                            temperature=temperature if sampling else None,
                            top_p=top_p if sampling else None, top_k=0 if sampling else None,
                            eos_token_id=sorted(stops), pad_token_id=pad)


@torch.no_grad()
def generate(model, prompts, config, pad):
    """One generate call on a list of prompts (token-id lists), left-padded. Returns the new ids,
    one list per prompt, uncut (B, new)."""
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)  # (b, P)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)  # (b, P)
    with checkpoint_settings_hidden(model):
        # synced_gpus: under FSDP every rank must run the same number of forward passes, so a
        # rank that finished keeps stepping until all have (no effect in one process)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             synced_gpus=distributed())  # (b, P + new)
    return out[:, P:].tolist()


def cut_at_stop(row, stops):
    """A response up to and including its first stop id (the whole row if none: truncated)."""
    end = next((j for j, t in enumerate(row) if t in stops), None)
    return row if end is None else row[:end + 1]


@torch.no_grad()
def sample(model, tokenizer, prompts, samples_per_prompt=1, max_new_tokens=256, temperature=1.0,
           top_p=1.0, batch_size=32, progress=False):
    """Sample `samples_per_prompt` rollouts per prompt, `batch_size` sequences at a time so the KV
    cache fits. temperature 0 is greedy. Rollouts of one prompt are consecutive."""
    from tqdm import tqdm
    stops, pad = stop_ids(model, tokenizer), pad_id(tokenizer)
    config = generation_config(max_new_tokens, temperature, top_p, stops, pad)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    responses, was_training = [], model.training
    model.eval()
    for i in tqdm(range(0, len(flat), batch_size), desc="sample", disable=not progress, leave=False):
        responses += [cut_at_stop(row, stops) for row in generate(model, flat[i:i + batch_size],
                                                                  config, pad)]
    model.train(was_training)
    return Rollouts(prompts=flat, responses=responses,  # no stop id at the end: cut at the cap
                    truncated=[not r or r[-1] not in stops for r in responses])


# ---------------------------------------------------------------------------------------------
# Multi-turn tool-use episodes (Qwen3's hermes tool format)
# ---------------------------------------------------------------------------------------------

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
SENTINEL = "TIP-turn-sentinel-7f3a"  # stands in for an assistant turn when rendering between turns


@dataclasses.dataclass
class Episode:
    prompt: list  # ids of the rendered system prompt, tools and query, up to the first turn
    response: list = dataclasses.field(default_factory=list)  # every id after the prompt
    mask: list = dataclasses.field(default_factory=list)  # 1: the student generated the id
    messages: list = dataclasses.field(default_factory=list)  # assistant turns and tool answers
    turns: int = 0
    tool_calls: int = 0
    truncated: bool = False  # stopped by a limit before a turn without tool calls: undelivered
    done: bool = False
    final: str = ""  # the text of the last turn (after any </think>) when the episode finished


def parse_tool_calls(text):
    """The (name, arguments) of every <tool_call> block of one turn's text, in order.

    A block that is not a JSON object keeps what can be read: the name if a `"name": "..."` is in
    it (else ""), and the raw block as the arguments, which the tool then treats as it treats any
    malformed arguments (upstream: as {}, then schema validation answers with the error).
    """
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
            if not isinstance(call, dict):
                raise ValueError("not an object")
            calls.append((str(call.get("name") or ""), call.get("arguments", {})))
        except ValueError:
            found = re.search(r'"name"\s*:\s*"([^"]*)"', block)
            calls.append((found.group(1) if found else "", block))
    return calls


def between_turns(tokenizer, tool_messages, turn_end, enable_thinking=False):
    """The text the chat template puts after an assistant turn's end-of-turn token and before the
    next turn: the tool answers as it renders them, then the generation prompt. Rendered around a
    stand-in turn, so the student's own turns are never re-rendered."""
    stub = [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(stub + tool_messages, tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    start = text.index(SENTINEL) + len(SENTINEL)
    if not text[start:].startswith(turn_end):
        raise ValueError(f"the chat template does not end an assistant turn with {turn_end!r}")
    return text[start + len(turn_end):]


def turn_content(text):
    """The answer part of a turn: the text after its last </think> (all of it if none)."""
    return text.rsplit("</think>", 1)[-1].strip()


@torch.no_grad()
def run_episodes(model, tokenizer, prompts, tools, max_turns=30, max_new_tokens=2048,
                 max_total_tokens=40960, temperature=1.0, top_p=1.0, batch_size=32,
                 enable_thinking=False, progress=False):
    """Play one episode per prompt: `prompts[i]` (rendered ids) with tool caller `tools[i]`,
    a function (name, arguments) -> answer text (e.g. deepplanning.Sandbox(...).call).

    Each round samples one turn of every unfinished episode (batched, from P_S exactly, as
    `sample`), runs the turn's tool calls in order and appends their answers; an episode ends at a
    turn with no tool call (delivered), or is cut (truncated) when a turn hits `max_new_tokens`
    without ending, the sequence would pass `max_total_tokens`, or `max_turns` turns all called
    tools. Returns the Episodes in prompt order.
    """
    from tqdm import tqdm
    stops, pad = stop_ids(model, tokenizer), pad_id(tokenizer)
    config = generation_config(max_new_tokens, temperature, top_p, stops, pad)
    episodes = [Episode(prompt=list(p)) for p in prompts]
    was_training = model.training
    model.eval()
    for _ in tqdm(range(max_turns), desc="turns", disable=not progress, leave=False):
        active = [i for i, e in enumerate(episodes) if not e.done]
        # Under torchrun every rank must make the same generate calls (FSDP): a rank with fewer
        # episodes left generates for a stand-in and throws the result away.
        calls = all_reduce_max(-(-len(active) // batch_size))
        if calls == 0:
            break
        for j in range(calls):
            part = active[j * batch_size:(j + 1) * batch_size]
            ids = [episodes[i].prompt + episodes[i].response for i in part] or [episodes[0].prompt]
            for i, row in zip(part, generate(model, ids, config, pad)):
                take_turn(episodes[i], row, tokenizer, stops, tools[i], max_turns,
                          max_total_tokens, enable_thinking)
    model.train(was_training)
    return episodes


def take_turn(e, row, tokenizer, stops, call_tool, max_turns, max_total_tokens, enable_thinking):
    """Append one sampled turn to episode `e`, then its tool answers (or finish the episode)."""
    turn = cut_at_stop(row, stops)
    room = max_total_tokens - len(e.prompt) - len(e.response)
    ended = bool(turn) and turn[-1] in stops and len(turn) <= room
    turn = turn[:room]
    e.response += turn
    e.mask += [1] * len(turn)
    e.turns += 1
    text = tokenizer.decode(turn[:-1] if ended else turn)
    e.messages.append({"role": "assistant", "content": text})
    if not ended:  # cut by max_new_tokens or max_total_tokens mid-turn
        e.truncated = e.done = True
        return
    calls = parse_tool_calls(turn_content(text))
    if not calls:  # an answer: the episode is over
        e.final, e.done = turn_content(text), True
        return
    if e.turns >= max_turns:
        e.truncated = e.done = True
        return
    answers = [{"role": "tool", "name": name, "content": call_tool(name, arguments)}
               for name, arguments in calls]
    e.tool_calls += len(calls)
    e.messages += answers
    between = tokenizer(between_turns(tokenizer, answers, tokenizer.decode(turn[-1:]),
                                      enable_thinking), add_special_tokens=False)["input_ids"]
    if len(e.prompt) + len(e.response) + len(between) >= max_total_tokens:  # no room to go on
        e.truncated = e.done = True
        return
    e.response += between
    e.mask += [0] * len(between)


def as_rollouts(episodes):
    """The episodes as a Rollouts record: prompt, everything after it, and the generated mask."""
    return Rollouts(prompts=[e.prompt for e in episodes], responses=[e.response for e in episodes],
                    masks=[e.mask for e in episodes], truncated=[e.truncated for e in episodes])
