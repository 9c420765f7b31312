"""Data parallelism: `torchrun --nproc_per_node N train.py` runs N ranks, each on its part of every global
batch; gradients are averaged over the ranks before each (clipped) step, and statistics of the global batch
come from all-reduces. Without torchrun every function here is a no-op: torch.distributed is never touched."""
import os
from datetime import timedelta

import torch
import torch.distributed as td


def init(device="cpu", timeout_s=300):
    """(rank, N) under torchrun, the group joined: NCCL on CUDA (on GPU LOCAL_RANK), else gloo; (0, 1)
    without. A rank that exits makes torchrun end the others; a collective waiting timeout_s raises."""
    if "WORLD_SIZE" in os.environ:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        td.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return rank(), world_size()


def on(): return td.is_available() and td.is_initialized()  # in a group (under torchrun)?
def rank(): return td.get_rank() if on() else 0  # this rank, 0 to N - 1
def world_size(): return td.get_world_size() if on() else 1  # N
def is_main(): return rank() == 0  # rank 0 alone writes files and prints
def barrier(): return td.barrier() if on() else None  # wait for every rank
def close(): return (td.barrier(), td.destroy_process_group()) if on() else None  # together, then leave
def all_mean(x): return all_sum(x) / world_size()  # a tensor's mean over the ranks
def all_max(x): return all_sum(x, "MAX")  # its max over the ranks
def shard(n): return slice(n * rank() // world_size(), n * (rank() + 1) // world_size())  # my rows of n
def gather(obj): return td.all_gather_object(out := [obj] * world_size(), obj) or out if on() else [obj]


def per_rank(n):  # n / N; a ValueError unless N divides n (where the ranks must take the same steps)
    if n % world_size():
        raise ValueError(f"{n} does not split evenly over {world_size()} ranks")
    return n // world_size()


def all_sum(x, op="SUM"):
    """A copy of tensor x summed over the ranks (x itself in one process). gather(obj): every rank's obj
    (picklable: texts, CPU tensors of any length), in rank order ([obj] in one process)."""
    if on():
        td.all_reduce(x := x.detach().clone(), getattr(td.ReduceOp, op))
    return x


def rank_weight(count):
    """N * count / (count summed over ranks); 1 in one process. A mean over this rank's `count` items times
    this averages over the ranks to the mean over all their items: weight a loss so (gradients averaged)."""
    return world_size() * count / all_sum(count).clamp(min=1) if on() else 1.0


def average_gradients(params):
    """Average gradients over the ranks (DDP's job) in one all-reduce; between backward and clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if on() and grads:
        td.all_reduce(flat := torch.cat([g.reshape(-1) for g in grads]))
        for g, avg in zip(grads, (flat / world_size()).split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))
