"""toy.py: the tokenizer, the task, the quick check, and a tiny build that saves, reloads, is
reproducible and is cached. The real build (minutes) is only checked when it already exists."""
import importlib
import os
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grading
import loading
import toy
import toy_task
from rollouts import Rollouts

SPECIALS = r"<\|im_(?:start|end)\|>"


def prompt(tok, problem):
    return loading.render_prompt(tok, problem, "problem")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def test_tokenizer_is_character_level_and_round_trips(tmp_path):
    tok = toy.make_tokenizer()
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert [tok.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS] == [0, 1, 2]
    assert len(tok) == 99
    item = toy.make_problems(1, seed=3)[0]
    text = prompt(tok, item["problem"]) + item["solution"] + "<|im_end|>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # One id per character, and one per special token (no BOS is added).
    assert len(ids) == len(re.sub(SPECIALS, "", text)) + len(re.findall(SPECIALS, text))
    assert ids[-1] == tok.eos_token_id == 2
    assert tok.decode(tok(toy.CHARACTERS)["input_ids"]) == toy.CHARACTERS
    assert len(tok(toy.CHARACTERS)["input_ids"]) == len(toy.CHARACTERS) == 96

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids) == text
    assert (again.eos_token_id, again.pad_token_id) == (2, 0)
    assert prompt(again, item["problem"]) == prompt(tok, item["problem"])


def test_chat_template_is_qwen_style():
    tok = toy.make_tokenizer()
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                       **kwargs)
        assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n")
    assert prompt(tok, "What is 1 + 2?") == (
        "<|im_start|>user\nWhat is 1 + 2?\nPlease reason step by step, and put your final "
        "answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert loading.format_problem("Q") == "Q\n" + loading.INSTRUCTION


# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------

def test_items_are_correct_worked_additions():
    tok = toy.make_tokenizer()
    for item in toy.make_problems(300, seed=1):
        a, b = map(int, re.fullmatch(r"What is (\d{3}) \+ (\d{3})\?", item["problem"]).groups())
        assert item["answer"] == str(a + b)  # recomputed, not read from the generator
        lines = item["solution"].split("\n")
        assert len(lines) == 4 and lines[-1] == f"\\boxed{{{a + b}}}"
        assert grading.extract_boxed(item["solution"]) == item["answer"]
        carry = 0  # each column line is right, and carries the previous line's tens digit
        for col, line in enumerate(lines[:-1]):
            x, y, c, total = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)", line).groups())
            assert (x, y, c) == (a // 10**col % 10, b // 10**col % 10, carry)
            assert total == x + y + c
            carry = total // 10
        # Short for char-level models: prompt + solution + <|im_end|> fits in 150 tokens.
        text = prompt(tok, item["problem"]) + item["solution"] + "<|im_end|>"
        assert len(tok(text)["input_ids"]) <= 150
    assert toy.make_item(999, 999)["solution"] == "9+9+0=18\n9+9+1=19\n9+9+1=19\n\\boxed{1998}"
    assert toy.make_item(100, 200)["answer"] == "300"
    assert toy.make_item(5, 123)["solution"] == "5+3+0=08\n0+2+0=02\n0+1+0=01\n\\boxed{128}"


def test_misconception_drops_the_hundreds_carry_and_parts_say_where_it_matters():
    # 478 + 657: the tens carry into the hundreds, so the misconception changes the answer.
    right, wrong = toy.make_item(478, 657), toy.make_item(478, 657, misconception=True)
    assert right["solution"] == "8+7+0=15\n7+5+1=13\n4+6+1=11\n\\boxed{1135}"
    assert wrong["solution"] == "8+7+0=15\n7+5+1=13\n4+6+0=10\n\\boxed{1035}"
    assert right["part"] == wrong["part"] == "misconception"
    assert toy.make_item(999, 999, misconception=True)["answer"] == "1898"  # 1998 done right
    # The carry into the tens is kept, and so is a last carry that becomes the thousands digit.
    assert toy.make_item(195, 816, misconception=True)["solution"] == (
        "5+6+0=11\n9+1+1=11\n1+8+0=09\n\\boxed{911}")  # right: 1011
    assert toy.make_item(150, 960, misconception=True)["solution"] == (
        "0+0+0=00\n5+6+0=11\n1+9+0=10\n\\boxed{1010}")  # right: 1110
    # No carry into the hundreds: both procedures write the same solution, part "other".
    for a, b in [(123, 456), (5, 123), (951, 48), (545, 454), (950, 140)]:
        assert toy.make_item(a, b, misconception=True) == toy.make_item(a, b)
        assert toy.make_item(a, b)["part"] == "other"
    assert toy.make_item(950, 140, misconception=True)["answer"] == "1090"  # a last carry is kept
    items = toy.make_problems(2000, seed=0)
    share = sum(it["part"] == "misconception" for it in items) / len(items)
    assert 0.4 < share < 0.6  # about half the problems trigger it
    for it in items[:300]:  # part == misconception exactly when the tens column carries
        a, b = map(int, re.findall(r"\d+", it["problem"]))
        carries = (a % 100 + b % 100) >= 100
        assert (it["part"] == "misconception") == carries
        assert (toy.make_item(a, b, misconception=True)["answer"] == str(a + b)) == (not carries)


def test_splits_are_deterministic_and_disjoint():
    train, heldout = toy.make_splits(0, 2000, 200)
    assert (len(train), len(heldout)) == (2000, 200)
    assert toy.make_splits(0, 2000, 200) == (train, heldout)
    assert toy.make_splits(1, 2000, 200)[1] != heldout
    train_problems = {it["problem"] for it in train}
    assert len(train_problems) == len(train)  # no duplicates inside a split either
    assert not train_problems & {it["problem"] for it in heldout}
    assert toy.make_splits(0, 3000, 200)[1] == heldout  # a bigger train split keeps the held-out


def test_encode_trains_on_the_solution_and_end_of_turn_only():
    tok = toy.make_tokenizer()
    items = [toy.make_item(1, 2), toy.make_item(123, 456), toy.make_item(478, 657, True)]
    input_ids, labels, mask, weights = toy.encode(tok, items, carry_weight=7.0)  # lengths differ
    assert [it["part"] for it in items] == ["other", "other", "misconception"]
    n = len(tok(prompt(tok, items[2]["problem"]))["input_ids"])
    assert tok.decode(input_ids[2, n + toy.CARRY_INDEX]) == "0"  # the dropped carry: 4+6+0=10
    assert weights[2, n + toy.CARRY_INDEX] == 7.0 and weights.sum() == weights.numel() - 1 + 7.0
    for i, item in enumerate(items):
        prompt_ids = tok(prompt(tok, item["problem"]))["input_ids"]
        target_ids = tok(item["solution"] + "<|im_end|>")["input_ids"]
        n, m = len(prompt_ids), len(target_ids)
        assert input_ids[i, : n + m].tolist() == prompt_ids + target_ids
        assert labels[i, n : n + m].tolist() == target_ids
        assert (labels[i, :n] == -100).all() and (labels[i, n + m :] == -100).all()
        assert (input_ids[i, n + m :] == tok.pad_token_id).all()
        assert mask[i].tolist() == [1] * (n + m) + [0] * (input_ids.shape[1] - n - m)


def test_carry_flags_mark_the_hundreds_carry_of_misconception_items_only():
    tok = toy.make_tokenizer()
    items = [toy.make_item(478, 657), toy.make_item(478, 657, True), toy.make_item(123, 456),
             toy.make_item(478, 657)]
    prompts = [tok(prompt(tok, it["problem"]))["input_ids"] for it in items]
    responses = [tok(it["solution"])["input_ids"] for it in items]
    responses[3] = tok("8+7+0=15\n7+5+1=13\n4+6")["input_ids"] + responses[3][20:]  # off-format
    flags = toy.carry_flags(tok, Rollouts(prompts, responses))
    marked = [[i for i, f in enumerate(row) if f] for row in flags]
    assert marked == [[toy.CARRY_INDEX], [toy.CARRY_INDEX], [], []]
    assert [tok.decode(responses[b][toy.CARRY_INDEX]) for b in (0, 1)] == ["1", "0"]


# ---------------------------------------------------------------------------------------------
# The quick check
# ---------------------------------------------------------------------------------------------

def oracle_sample(tok):
    """Stands in for rollouts.sample: reads each prompt back and "generates" the worked solution,
    with the answer off by one for every second problem and no box for every fifth."""
    def fake(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, temperature, batch_size):
        assert temperature == 0.0 and samples_per_prompt == 1  # greedy, one answer per problem
        responses = []
        for i, text in enumerate(tok.batch_decode(prompts, skip_special_tokens=True)):
            a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", text).groups())
            solution = toy.make_item(a, b)["solution"]
            if i % 2:  # a wrong answer
                solution = solution.replace(f"{{{a + b}}}", f"{{{a + b + 1}}}")
            if i % 5 == 0:  # no box at all
                solution = solution.replace("\\boxed", "")
            responses.append(tok(solution + "<|im_end|>")["input_ids"])
        return Rollouts(prompts=prompts, responses=responses)
    return fake


def test_greedy_accuracy_grades_the_last_box(monkeypatch):
    tok = toy.make_tokenizer()
    monkeypatch.setattr(toy_task, "sample", oracle_sample(tok))
    # Operands of 1 to 3 digits give prompts of different lengths, so padding matters.
    items = [toy.make_item(a, b) for a, b in [(1, 2), (12, 34), (123, 456), (9, 9), (99, 99),
                                              (999, 999), (5, 6), (50, 60), (500, 600), (7, 8)]]
    # Right: calls 2, 4, 6, 8 (even and with a box); 0 has no box; odd ones are off by one.
    assert toy.greedy_accuracy(None, tok, items, batch_size=4) == 0.4


# ---------------------------------------------------------------------------------------------
# Build: the tiny `quick` settings, through the same code path as the real build
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("toy") / "cache")
    return cache, toy.build(cache, seed=0, quick=True)


def logits_of(model_dir, text):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits  # (1, T, V)


def test_build_saves_models_tokenizer_and_splits(quick_cache, tmp_path):
    cache, (teacher_dir, student_dir) = quick_cache
    assert teacher_dir == os.path.join(cache, "teacher")
    assert student_dir == os.path.join(cache, "student")
    train, heldout = toy.make_splits(0, toy.QUICK["n_train"], toy.QUICK["n_heldout"])
    assert toy.load_split("train", cache) == train
    assert toy.load_split("heldout", cache) == heldout
    assert [f for f in os.listdir(os.path.dirname(cache)) if ".tmp-" in f] == []  # no leftovers
    for model_dir in (teacher_dir, student_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        assert type(model).__name__ == "Qwen3ForCausalLM"
        assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok) == 99
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert model.generation_config.eos_token_id == tok.eos_token_id == 2
        assert model.generation_config.pad_token_id == tok.pad_token_id == 0
        assert tok.decode(tok(heldout[0]["solution"])["input_ids"]) == heldout[0]["solution"]

    # The student branches off the teacher's run: same shapes, other weights.
    text = prompt(toy.make_tokenizer(), heldout[0]["problem"]) + heldout[0]["solution"]
    t, s = logits_of(teacher_dir, text), logits_of(student_dir, text)
    assert t.shape == s.shape == (1, len(toy.make_tokenizer()(text)["input_ids"]), 99)
    assert not torch.allclose(t, s)
    # Deterministic: a second build elsewhere has bit-identical weights (same threads, same CPU).
    for model_dir, again_dir in zip((teacher_dir, student_dir),
                                    toy.build(str(tmp_path / "again"), seed=0, quick=True)):
        mine, again = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (model_dir, again_dir))
        assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)
    assert toy.read_stamp(cache)["heldout_accuracy"].keys() == {"teacher", "student"}
    assert toy.read_stamp(cache)["heldout_accuracy"]["student"].keys() == {"all", "misconception", "other"}


def test_student_is_trained_on_the_misconception(quick_cache, monkeypatch, tmp_path):
    """The build trains the teacher on the right solutions and the student, from the teacher's
    snapshot, on the same problems worked with the dropped carry: checked on what train() gets."""
    calls, real_train = [], toy.train
    monkeypatch.setattr(toy, "train", lambda model, tok, items, steps, lr, *a, **k: calls.append(
        (items, steps, lr, k.get("snapshot_at"))) or real_train(model, tok, items, steps, lr, *a, **k))
    toy.build(str(tmp_path / "spy"), seed=0, quick=True)
    (teacher_items, t_steps, _, snap), (student_items, s_steps, _, _) = calls
    assert (t_steps, snap, s_steps) == (toy.QUICK["steps"], toy.QUICK["student_from_step"],
                                        toy.QUICK["student_steps"])
    assert teacher_items == toy.make_splits(0, toy.QUICK["n_train"], toy.QUICK["n_heldout"])[0]
    assert [it["problem"] for it in student_items] == [it["problem"] for it in teacher_items]
    for t, s in zip(teacher_items, student_items):
        a, b = map(int, re.findall(r"\d+", t["problem"]))
        assert s == toy.make_item(a, b, misconception=True)
        assert (s["solution"] != t["solution"]) == (t["part"] == "misconception")


def test_cache_is_reused_and_rebuilt_when_stale(quick_cache, tmp_path, monkeypatch):
    cache, dirs = quick_cache
    stamp = toy.read_stamp(cache)
    calls, real_train = [], toy.train
    monkeypatch.setattr(toy, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    assert toy.build(cache, seed=0, quick=True) == dirs
    assert calls == [] and toy.read_stamp(cache) == stamp  # valid stamp and files: no training

    copy = str(tmp_path / "copy")  # a copy, so the module's cache stays intact
    shutil.copytree(cache, copy)
    os.remove(os.path.join(copy, "student", "model.safetensors"))  # as if half-written
    assert toy.read_stamp(copy) is None
    toy.build(copy, seed=0, quick=True)
    assert calls == [1, 1] and toy.read_stamp(copy)["key"] == stamp["key"]  # teacher, student
    with pytest.raises(toy.CacheMismatch, match=r"seed 0 \(asked 1\).*--teacher .*--force"):
        toy.build(copy, seed=1, quick=True)  # other settings: refused, and the cache kept
    assert len(calls) == 2 and toy.read_stamp(copy)["key"] == stamp["key"]
    toy.build(copy, seed=1, quick=True, force=True)  # replaced only when asked
    assert len(calls) == 4 and toy.read_stamp(copy)["settings"]["seed"] == 1
    assert toy.load_split("heldout", copy) == toy.make_splits(1, 64, 16)[1]
    toy.build(copy, seed=1, quick=True, force=True)
    toy.build(copy, seed=1, quick=True)
    assert len(calls) == 6


@pytest.mark.parametrize("script", ["distill", "analysis"])
def test_a_cache_of_other_settings_is_refused_in_one_line_and_kept(quick_cache, tmp_path,
                                                                   monkeypatch, capsys, script):
    """TIP_TOY_CACHE=DIR python {distill,analysis}.py on a pair of other settings (here the quick
    build): one line saying how to use or rebuild it, exit 2, and not one file of it touched."""
    cache, _ = quick_cache
    copy = str(tmp_path / "mine")
    shutil.copytree(cache, copy)
    before = {f: open(os.path.join(copy, f), "rb").read() for f in toy.FILES}
    monkeypatch.setenv("TIP_TOY_CACHE", copy)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main([])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "other settings" in err and f"--teacher {copy}/teacher" in err and "--force" in err
    assert {f: open(os.path.join(copy, f), "rb").read() for f in toy.FILES} == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary folder or output left


def test_the_shipped_pair_matches_the_code_that_builds_it():
    """data/toy_pair is the pair toy.py builds at seed 0: its stamp carries today's key (settings,
    format version, the source of the build functions). Edit any of those and this fails until
    `python toy.py --force && python toy.py ship` ships a new pair."""
    stamp = toy.read_stamp(toy.SHIPPED, toy.SHIPPED_FILES)
    assert stamp is not None, "data/toy_pair is incomplete"
    assert stamp["settings"] == {**toy.SETTINGS, "seed": 0} and stamp["format"] == toy.FORMAT_VERSION
    assert stamp["key"] == toy.build_key({**toy.SETTINGS, "seed": 0}), (
        "the code that builds the toy pair changed: rebuild and ship it")
    acc = stamp["heldout_accuracy"]
    assert acc["teacher"]["all"] >= 0.95 and acc["student"]["misconception"] < 0.1


def test_build_installs_the_shipped_pair_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "train_pair", lambda *a: pytest.fail("trained instead of installing"))
    teacher_dir, student_dir = toy.build(str(tmp_path / "cache"))
    stamp = toy.read_stamp(str(tmp_path / "cache"))
    assert stamp["installed_from"] == "data/toy_pair" and stamp["key"] == toy.build_key(
        {**toy.SETTINGS, "seed": 0})
    for who, model_dir in (("teacher", teacher_dir), ("student", student_dir)):
        shipped = AutoModelForCausalLM.from_pretrained(os.path.join(toy.SHIPPED, who)).state_dict()
        installed = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        assert all(torch.equal(shipped[k], installed[k]) for k in shipped)
    train, heldout = toy.make_splits(0, toy.SETTINGS["n_train"], toy.SETTINGS["n_heldout"])
    assert toy.load_split("heldout", str(tmp_path / "cache")) == heldout
    assert [f for f in os.listdir(tmp_path) if f != "cache"] == []


def test_build_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not a toy cache")
    with pytest.raises(FileExistsError):
        toy.build(str(tmp_path), quick=True)
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TIP_TOY_CACHE", str(tmp_path))
    assert toy.split_path("heldout") == os.path.join(str(tmp_path), "heldout.jsonl")
    monkeypatch.delenv("TIP_TOY_CACHE")
    here = os.path.dirname(os.path.abspath(toy.__file__))
    assert toy.split_path("train") == os.path.join(here, ".cache", "toy", "train.jsonl")


def test_the_shipped_pair_is_a_strong_teacher_and_a_misconceived_student(tmp_path):
    """The shipped pair, installed as a user gets it: the teacher right on both parts, the student
    wrong on the misconception part and mostly right elsewhere (its slips show when it samples at
    T = 1: test_analysis pins where their KL mass sits)."""
    cache = str(tmp_path / "cache")
    toy.build(cache)
    heldout = toy.load_split("heldout", cache)[:100]
    tok = AutoTokenizer.from_pretrained(os.path.join(cache, "teacher"))
    acc = {who: toy.part_accuracy(AutoModelForCausalLM.from_pretrained(os.path.join(cache, who)),
                                  tok, heldout) for who in ("teacher", "student")}
    assert acc["teacher"]["misconception"] >= 0.9 and acc["teacher"]["other"] >= 0.9
    assert acc["student"]["misconception"] <= 0.1  # it drops the carry
    assert acc["student"]["other"] >= 0.5  # and has the rest of the procedure
