"""bench.py: the quick run produces every row with its ratios, and the loss paths it compares
(naive full logits, gathered, chunked with recompute, distill.py's chunked opd_step) give the same
loss and gradients.
Times and memory are reported by the benchmark, never asserted here."""
import json

import pytest
import torch

import bench
from helpers import fp32_loss_tolerance


def quick_spec(path, keep):
    specs = bench.resolve_specs(bench.parse_args(["--quick"]))
    return next(s for s in specs
                if (s["path"], s["keep"], s["checkpointing"]) == (path, keep, False))


def forward_backward(path, keep):
    """Loss, kept count and student gradients of one path on the quick configuration."""
    _, teacher, student, _, rollouts, cfg = bench.setup(quick_spec(path, keep))
    loss, n_kept = bench.FORWARD_BACKWARD[path](student, teacher, rollouts, cfg,
                                                torch.Generator().manual_seed(3))
    return loss, n_kept, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("path", ["gathered", "recompute", "chunked"])
def test_paths_give_the_naive_loss_and_gradients(path, keep):
    ref_loss, ref_kept, ref_grads = forward_backward("naive", keep)
    loss, n_kept, grads = forward_backward(path, keep)
    batch, response = quick_spec(path, keep)["batch"], quick_spec(path, keep)["response_length"]
    assert n_kept == ref_kept == batch * max(1, int(keep * response))  # the same selection size
    # fp32 paths that round differently: a KL of 0.017 is a small difference of log-probabilities
    # near -log V, so compare within fp32's own error for one token (the loss is a mean)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=2 * fp32_loss_tolerance(1, quick_spec(path, keep)["vocab"]))
    assert loss > 0  # random teacher and student disagree: a real, non-zero signal
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-7, rtol=1e-4), name
    assert ref_grads["model.embed_tokens.weight"].abs().sum() > 0  # tied lm_head got a gradient


def test_quick_run_prints_the_table_with_ratios(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    bench.main(["--quick", "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    rows = json.loads(out_json.read_text())

    keeps = (1.0, 0.5, 0.2, 0.1)
    expected = ({(p, k, False) for p in bench.PATHS for k in keeps}
                | {("chunked", k, True) for k in keeps})
    assert {(r["path"], r["keep"], r["gradient_checkpointing"]) for r in rows} == expected
    naive = bench.find(rows, "naive", 1.0)
    assert naive["rule"] == "all" and naive["peak_memory_ratio"] == 1.0
    assert naive["step_time_ratio"] == 1.0
    for r in rows:
        assert r["peak_memory_bytes"] > 0 and r["step_seconds"] > 0
        ratio = r["peak_memory_bytes"] / naive["peak_memory_bytes"]
        assert r["peak_memory_ratio"] == pytest.approx(ratio)
        # every configuration, in its own process, trained the same tokens to the same loss
        same_keep = bench.find(rows, "naive", r["keep"])
        assert r["kept_tokens"] == same_keep["kept_tokens"]
        assert r["loss"] == pytest.approx(same_keep["loss"], rel=1e-5)

    configurations, standing = printed.split("where the step stands:")
    table = [line for line in configurations.splitlines() if line.startswith("| ")]
    assert "× naive" in table[0] and len(table) == 1 + len(expected)
    summary = [line.split(" | ") for line in standing.splitlines() if line.startswith("| ")]
    figures = {row[0][2:]: row[1] for row in summary[1:]}  # name -> value as printed
    for loss in ("reverse_kl", "forward_kl", "jsd"):
        timed = [name for name in figures if name.startswith(f"loss {loss} forward + backward")]
        assert len(timed) == 1 and "CPU time, median of 1 interleaved rounds, range" in timed[0]
        assert sum(name.startswith(f"loss {loss} working set") for name in figures) == 1
    padding = {name: float(v) for name, v in figures.items() if name.startswith("padding")}
    assert len(padding) == 2 and all(1.0 <= v <= 1.1 for v in padding.values())  # seeded mixes
    chunked_half = bench.find(rows, "chunked", 0.5)
    assert figures["step, chunked keep 0.5: peak memory / naive all-token"] == \
        f"{chunked_half['peak_memory_ratio']:.2f}"
    assert any(line.startswith("| naive | 1 | all | off |") and "| 1.00 |" in line for line in table)
    assert sum(line.startswith("target ") for line in printed.splitlines()) == 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cost = [line for line in printed.splitlines() if line.startswith("precision: ")]
    assert len(cost) == 1 and "fp32" in cost[0] and "MiB once per call" in cost[0]
