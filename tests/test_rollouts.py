"""rollouts.py: rollouts come from P_S exactly, whatever the checkpoint ships; collation and masks."""
import pytest
import torch
from transformers import GenerationConfig, TemperatureLogitsWarper, TopPLogitsWarper

import loading
from helpers import make_model, make_tokenizer
from loading import hidden_states, lm_head
from rollouts import collate, sample, stop_ids


@pytest.fixture(scope="module")
def opinionated(tmp_path_factory):
    """A student whose checkpoint ships every sampling default that would bend its rollouts: a
    repetition penalty, top-k 20, temperature 0.6 and a no-repeat n-gram size (the Qwen2.5
    instruct and Qwen3 checkpoints ship some of these). Its final norm is scaled up, which scales
    every logit by 6, so that P_S spreads over a few dozen tokens and any reshaping is visible."""
    tok = make_tokenizer()
    model = make_model(tok, 1, 32, seed=3)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)
    model.generation_config = GenerationConfig(
        repetition_penalty=1.1, top_k=20, temperature=0.6, no_repeat_ngram_size=2, do_sample=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("opinionated") / "student"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = loading.load_model(str(path), torch.device("cpu"), torch.float32).eval()
    assert loaded.generation_config.repetition_penalty == 1.1  # the checkpoint really carries it
    return tok, loaded


def prompt_ids(tok, text="12+12=12+"):
    return tok(text, add_special_tokens=False)["input_ids"]


def processors_used(model, monkeypatch):
    """Record the logits processors and warpers that generate() builds."""
    seen = []
    real = model._get_logits_processor

    def spy(*args, **kwargs):
        processors = real(*args, **kwargs)
        seen.append(list(processors))
        return processors
    monkeypatch.setattr(model, "_get_logits_processor", spy)
    return seen


@pytest.mark.parametrize("temperature,top_p,expected", [
    (1.0, 1.0, []), (0.7, 1.0, [TemperatureLogitsWarper]), (1.0, 0.9, [TopPLogitsWarper])])
def test_no_processor_from_the_checkpoint_runs(opinionated, monkeypatch, temperature, top_p, expected):
    tok, model = opinionated
    seen = processors_used(model, monkeypatch)
    sample(model, tok, [prompt_ids(tok)], 2, 3, temperature=temperature, top_p=top_p)
    assert [type(p) for p in seen[0]] == expected
    assert model.generation_config.repetition_penalty == 1.1  # the model's own config is restored


def test_sampled_frequencies_match_the_plain_softmax(opinionated):
    tok, model = opinionated
    p = prompt_ids(tok)
    with torch.no_grad():
        h = hidden_states(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
        probs = torch.softmax(h[0, -1] @ lm_head(model).T, -1)  # (V,) P_S at the next position
    torch.manual_seed(0)
    n = 40_000
    rollouts = sample(model, tok, [p], n, 1, batch_size=10_000)
    freq = torch.bincount(torch.tensor([r[0] for r in rollouts.responses]), minlength=len(probs))
    tv = 0.5 * (freq / n - probs).abs().sum().item()
    # what the checkpoint's settings would have drawn instead (top-k 20, T 0.6 alone)
    z = h[0, -1] @ lm_head(model).T
    bent = torch.softmax(torch.where(z >= z.topk(20).values[-1], z, -float("inf")) / 0.6, -1)
    assert tv < 0.04, tv  # sampling noise at n = 40,000 is ~0.015
    assert 0.5 * (bent - probs).abs().sum().item() > 0.3  # so the bound would catch the bending


def test_greedy_is_the_argmax_and_cut_after_the_first_eos(opinionated):
    tok, model = opinionated
    prompts = [prompt_ids(tok), prompt_ids(tok, "7*3=")]
    rollouts = sample(model, tok, prompts, 1, 6, temperature=0.0)
    stops = stop_ids(model, tok)
    for p, r in zip(prompts, rollouts.responses):
        assert all(t not in stops for t in r[:-1])  # nothing after the first EOS
        ids = p + r
        with torch.no_grad():
            h = hidden_states(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            argmax = (h[0] @ lm_head(model).T).argmax(-1)  # (L,)
        assert r == argmax[len(p) - 1:len(ids) - 1].tolist()  # each token the argmax before it


def test_collate_masks_only_generated_response_tokens():
    ids, attn, mask = collate([[5, 6, 7], [8]], [[10, 11, 2], [12, 13]], pad=0,
                              masks=[[1, 0, 1], [1, 1]])
    assert ids.tolist() == [[5, 6, 7, 10, 11, 2], [0, 0, 8, 12, 13, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    # token 11 (a tool result, say) is not trained: its loss position (index 3) is False
    assert mask.tolist() == [[False, False, True, False, True, False],
                             [False, False, True, True, False, False]]
