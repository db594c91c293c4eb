"""torchrun + FSDP2 on the CPU (gloo): two processes select the same tokens, compute the same loss
and make the same update as one process over the same rollouts; a 2-process CLI run saves a
checkpoint that from_pretrained loads."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import opd_step
import quadrant_inputs
import evaluate
import loading
import parallel
import rollouts as ro
import selection
from loading import hidden_states, lm_head
from rollouts import Rollouts, collate
from helpers import make_tiny_pair, write_jsonl
from task_api import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 40, 41, 42, 2, 1, 50], [1, 43, 2, 1, 50], [1, 44, 45, 2, 1, 50], [1, 46, 2, 1, 50]]
RESPONSES = [[20, 21, 22, 23, 24, 2], [25, 26, 27, 2], [28, 29, 30, 31, 32, 33, 34, 2], [35, 36]]


def worker(rank, world, port, pair, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel.setup_distributed("cpu")
    cpu = torch.device("cpu")
    teacher = loading.load_model(pair[0], cpu, torch.float32).eval().requires_grad_(False)
    student = loading.load_model(pair[1], cpu, torch.float32)
    if world > 1:
        parallel.shard(teacher), parallel.shard(student)
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)  # contiguous: rank 0 first
    rollouts = Rollouts(PROMPTS[share], RESPONSES[share])
    cfg = opd_step.StepSettings(rule="soft-or", keep=0.5, loss="reverse_kl", beta=0.5,
                                importance_weights=False, micro_batch_size=4, micro_batch_tokens=10**6, chunk_size=3,
                                dtype=torch.float32, pad_id=0)
    # the selection, by the same functions opd_step uses, as kept response-token indices
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, 0)
    with torch.no_grad():
        stats = quadrant_inputs.batch_statistics(hidden_states(student, ids, attn),
                                                 lm_head(student), hidden_states(teacher, ids, attn),
                                                 lm_head(teacher), mask, 3, gather=parallel.gather)
    kept, _ = selection.select("soft-or", stats, mask, 0.5)
    mine = [[i for i, k in enumerate(kept[b][mask[b]].tolist()) if k] for b in range(len(kept))]
    # SGD, so that weight differences are gradient differences (Adam's first step divides by |g|
    # and would magnify float noise in near-zero gradient entries)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    metrics = opd_step.opd_step(student, teacher, rollouts, cfg, torch.Generator(), {})
    norm = parallel.clip_grad_norm(student, 1.0)
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # The evaluation: each rank samples its share of 5 problems (greedy), the rows are gathered.
    tok = loading.load_tokenizer(pair[1])
    problems = [{"problem": f"{a}+{a}=?", "answer": str(2 * a)} for a in range(5)]
    _, rows = evaluate.evaluate_benchmark(student, tok, "mini", Settings(max_new_tokens=4, batch_size=2,
                                                                        temperature=0.0),
                                          problems=problems, return_rows=True)
    # Episodes: rank 0 plays two, rank 1 one, one per generate call, so the ranks need different
    # numbers of calls; a deadlock here would hang the test.
    episodes = ro.run_episodes(student, tok, PROMPTS[:2 - rank], [lambda n, a: "{}"] * 2,
                               max_new_tokens=3, batch_size=1)
    selected = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(selected, mine)
        del student, teacher, optimizer
        parallel.teardown()
    else:
        selected = [mine]
    if rank == 0:
        torch.save({"selected": sum(selected, []), "loss": metrics["loss"], "norm": norm,
                    "kept_tokens": metrics["kept_tokens"], "weights": weights,
                    "eval": [(r["index"], r["completion"]) for r in rows],
                    "episodes": [e.turns for e in episodes]}, out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("pair"), teacher_layers=2, student_layers=2)


def test_two_processes_match_one(pair, tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        mp.start_processes(worker, args=(world, free_port(), pair, str(out)), nprocs=world,
                           start_method="spawn")
        results[world] = torch.load(out, weights_only=False)
    one, two = results[1], results[2]
    from safetensors.torch import load_file
    initial = load_file(os.path.join(pair[1], "model.safetensors"))
    assert one["selected"] == two["selected"]
    assert [len(s) for s in one["selected"]] == [3, 2, 4, 1]  # max(1, ⌊0.5·m⌋) per rollout
    assert one["kept_tokens"] == two["kept_tokens"] == 10
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-4)
    assert one["weights"].keys() == two["weights"].keys()
    moved = 0
    for k in one["weights"]:
        assert torch.allclose(one["weights"][k], two["weights"][k], atol=1e-6), k
        moved += k in initial and not torch.equal(one["weights"][k], initial[k])
    assert moved > 10
    assert two["eval"] == one["eval"] and [i for i, _ in one["eval"]] == [0, 1, 2, 3, 4]
    assert one["episodes"] == two["episodes"] == [1, 1]  # rank 0's two, each cut in its turn


def test_torchrun_cli_two_processes_saves_a_loadable_checkpoint(pair, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"{a}+{a}=?"} for a in range(6)])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", os.path.join(REPO, "distill.py"),
                        "--teacher", pair[0], "--student", pair[1], "--dataset", data,
                        "--rule", "soft-or", "--steps", "2", "--prompts-per-step", "2",
                        "--samples-per-prompt", "2", "--max-new-tokens", "6", "--lr", "1e-3",
                        "--device", "cpu", "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [rec["step"] for rec in records] == [1, 2]
    assert r.stdout.count("step    1/2") == 1  # rank 0 alone logs
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-000002")
    reference = AutoModelForCausalLM.from_pretrained(pair[1])
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
