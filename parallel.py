"""Scale out: torchrun + FSDP2, and the few collectives that keep N processes equal to one.

    torchrun --nproc_per_node N distill.py --teacher ... --student ...

Each rank samples its own share of the step's prompts (with its own seed), then everything that
must be global is made global: the number of kept tokens that normalises the loss, the per-batch
normalisation and quadrant thresholds of the TIP axes (the per-position values are gathered), and
the logged metrics. Without torchrun every function here is the identity or a no-op.
"""
import os

import torch


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather(values):
    """Concatenate a 1-D tensor over all ranks. Returns (all values, offset of this rank's)."""
    if not distributed():
        return values, 0
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([values.numel()], device=values.device))
    sizes = [int(s) for s in sizes]
    padded = values.new_zeros(max(sizes))  # all_gather needs equal shapes: pad, then trim
    padded[:values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def rank():
    return torch.distributed.get_rank() if distributed() else 0


def world_size():
    return torch.distributed.get_world_size() if distributed() else 1


def shared_map(n, fn):
    """Items 0..n-1 split over the ranks: this rank calls fn(its indices) -> one result per index,
    and every rank gets all n results in order. Rank r takes r, r + N, r + 2N, ..., padded with a
    repeat of its last so that every rank makes the same generate calls (FSDP needs that)."""
    world = world_size()
    share = list(range(rank(), n, world))
    share += share[-1:] * (-(-n // world) - len(share))
    results = dict(zip(share, fn(share)))
    if distributed():
        parts = [None] * world
        torch.distributed.all_gather_object(parts, results)
        for part in parts:
            results.update(part)
    return [results[i] for i in range(n)]


def all_reduce_sum(x):
    """Sum a number over ranks (identity in one process)."""
    return _all_reduce(x, "SUM")


def all_reduce_max(x):
    """The largest value of a number over ranks (identity in one process)."""
    return _all_reduce(x, "MAX")


def _all_reduce(x, op):
    if not distributed():
        return x
    t = torch.tensor(float(x), dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return type(x)(t.item()) if op == "MAX" else t.item()


def setup_distributed(device_name):
    """Join the process group that torchrun describes (nccl on CUDA, gloo on CPU).
    Returns (rank, world size); (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world


def teardown():
    """Leave the process group: wait for every rank, free what still holds the group (sharded
    models keep it through their device mesh), then destroy it. Destroying it while a sharded
    model is alive can abort the process at exit ("terminate called without an active
    exception"), after all the work is done. No-op without torchrun."""
    if not distributed():
        return
    import gc
    torch.distributed.barrier()
    gc.collect()
    torch.distributed.destroy_process_group()


def shard(model):
    """FSDP2: shard each decoder layer across ranks. Embeddings, the final norm and the lm_head
    stay whole on every rank, because the statistics and the chunked loss use the lm_head weight
    outside the model's forward, where FSDP would not gather it."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.base_model.layers:
        # Each layer is its own FSDP root here, and a root keeps its gathered weights after the
        # forward unless told otherwise: that would hold every layer whole at once.
        fully_shard(layer, reshard_after_forward=True)
    return model


def clip_grad_norm(model, max_norm):
    """Average the replicated parameters' gradients over ranks (FSDP has already averaged the
    sharded ones), then clip the global gradient norm. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not distributed():
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    sharded = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    replicated = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum()
        else:
            torch.distributed.all_reduce(g)  # gloo has no AVG: sum, then divide
            g.div_(torch.distributed.get_world_size())
            replicated += g.double().pow(2).sum()
    torch.distributed.all_reduce(sharded)
    norm = float((sharded + replicated).sqrt())
    scale = min(1.0, max_norm / (norm + 1e-6))
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm
