"""Data parallelism, all of it in this file. `torchrun --nproc_per_node N train.py`
starts N copies (ranks) with identical weights, each working on its share of every
batch. How every loss and figure becomes global:

  * A loss is a mean over the batch's items (tokens, answers, pairs). A rank's share
    is the mean over its own items times N * (its items / all items) (`share`,
    `step`'s count, `masked_mean`, `mean`); `step` averages the ranks' gradients,
    which is then exactly the gradient of the mean over every rank's items, as one
    process would compute it. Ranks hold different numbers of tokens: a per-rank
    mean would be wrong.
  * A logged figure is a sum over items divided by their number, both summed over
    the ranks (`mean_stats`): every rank logs the same value.
  * A std or a variance gathers every item (`gather_cat`); data that must be
    identical on every rank (the preference pairs) is rank 0's (`broadcast`).

Rank 0 alone writes files and prints. Without torchrun every function here is its
one-process version: torch.distributed is never touched.
"""
import hashlib
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as td

# Imported after init (torch._dynamo does, at the first optimizer) it would bind the
# group into its functions' defaults: the group, and gloo's threads, would outlive
# close(), and a thread alive at interpreter exit aborts the rank.
if td.is_available():
    import torch.distributed.nn  # noqa: F401


def init(device="cpu", timeout_s=300):
    """Join the ranks' group under torchrun -> (rank, N); (0, 1) without.
    NCCL on CUDA (GPU LOCAL_RANK), else gloo; a collective times out."""
    if "WORLD_SIZE" in os.environ:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        timeout = timedelta(seconds=timeout_s)
        td.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return rank(), world_size()


def on():  # in a group of ranks, under torchrun?
    return td.is_available() and td.is_initialized()


def rank():  # this rank, 0 to N - 1
    return td.get_rank() if on() else 0


def world_size():  # N
    return td.get_world_size() if on() else 1


def is_main():  # rank 0 alone writes files and prints
    return rank() == 0


def barrier():  # wait until every rank is here
    if on():
        td.barrier()


def close():
    """Leave the group, all ranks together (gloo's threads stop: see the imports)."""
    if on():
        td.barrier()
        td.destroy_process_group()


def shard(n):
    """This rank's slice of n rows: N nearly equal, consecutive parts."""
    return slice(n * rank() // world_size(), n * (rank() + 1) // world_size())


def per_rank(n):
    """n / N, or a ValueError unless N divides n (ranks must step together)."""
    if n % world_size():
        raise ValueError(f"{n} does not split evenly over {world_size()} ranks")
    return n // world_size()


def comm_device():
    """Where collectives take their tensors: the GPU under NCCL."""
    if on() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(x, op="SUM"):
    """A copy of tensor x summed over the ranks (x itself in one process)."""
    if on():
        x = x.detach().clone()
        td.all_reduce(x, getattr(td.ReduceOp, op))
    return x


def all_mean(x):  # tensor x averaged over the ranks
    return all_sum(x) / world_size()


def all_max(x):  # tensor x's maximum over the ranks
    return all_sum(x, "MAX")


def gather(obj):
    """Every rank's picklable obj, in rank order ([obj] in one process)."""
    out = [obj] * world_size()
    if on():
        td.all_gather_object(out, obj)
    return out


def gather_cat(x):
    """Every rank's tensor x (any length along dim 0), concatenated."""
    return torch.cat(gather(x.detach().cpu())).to(x.device)


def broadcast(obj):
    """Rank 0's picklable obj, on every rank."""
    box = [obj]
    if on():
        td.broadcast_object_list(box, src=0)
    return box[0]


def share(count):
    """N * count / (count summed over the ranks), 1 in one process (module docstring)."""
    if not on():
        return 1.0
    count = torch.as_tensor(count, dtype=torch.float32, device=comm_device())
    total = all_sum(count).clamp(min=1)
    return world_size() * count / total


def masked_mean(x, mask):
    """This rank's share of the mean of x over every rank's masked entries."""
    n = mask.sum()
    total = torch.where(mask.bool(), x, 0.0).sum()
    return total / n.clamp(min=1) * share(n)


def mean(x):
    """This rank's share of the mean of x (n,) over every rank's items."""
    return masked_mean(x.float(), torch.ones_like(x, dtype=torch.float32))


def mean_stats(sums, counts=None):
    """sums {name: this rank's sum over its items}, counts {name: their
    number} (or one count for all) -> {name: global mean}, one all-reduce
    (float64). counts None: the values are shares, averaged."""
    names = list(sums)
    if not isinstance(counts, dict):
        counts = dict.fromkeys(names, 1 if counts is None else counts)
    row = [float(sums[k]) for k in names] + [float(counts[k]) for k in names]
    row = all_sum(torch.tensor(row, dtype=torch.float64, device=comm_device()))
    totals, numbers = row[:len(names)], row[len(names):].clamp(min=1)
    return dict(zip(names, (totals / numbers).tolist()))


def average_gradients(params):
    """Average every gradient over the ranks (DDP's job), one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not on() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat)
    flat /= world_size()
    for g, avg in zip(grads, flat.split([x.numel() for x in grads])):
        g.copy_(avg.view_as(g))


def step(loss, optimizer, max_grad_norm, count=None, clip_each_group=False):
    """Backward, gradients averaged over the ranks, the norm clipped (all
    together, or each param group alone: PPO's policy, critic), the update.
    count: the loss is a mean over `count` items, weighted by share(count)."""
    if count is not None:
        loss = loss * share(count)
    groups = [g["params"] for g in optimizer.param_groups]
    params = [p for group in groups for p in group]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params)
    for group in (groups if clip_each_group else [params]):
        torch.nn.utils.clip_grad_norm_(group, max_grad_norm)
    optimizer.step()


def weights_digest(model):
    """sha256 (hex) of a model's state_dict, bit for bit."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        raw = t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        h.update(name.encode() + raw)
    return h.hexdigest()


def same_weights(model, what):
    """The ranks' common weights digest, or a RuntimeError naming `what`."""
    digests = gather(weights_digest(model))
    if len(set(digests)) > 1:
        short = ", ".join(d[:12] for d in digests)
        raise RuntimeError(f"{what}: the ranks' weights differ: {short}")
    return digests[0]


def exit_naming_rank(error, root):
    """End this rank with one line: its rank, the error, and the last frame
    of ours (under root) it came from, not N interleaved tracebacks."""
    ours = [f for f in traceback.extract_tb(error.__traceback__)
            if f.filename.startswith(root + os.sep)]
    where = os.path.basename(ours[-1].filename) if ours else ""
    if where == "dist.py":  # a collective broke: another rank died, and torchrun
        time.sleep(5)       # ends this one (its line or torchrun's says why)
    at = f" ({where}:{ours[-1].lineno})" if ours else ""
    first_line = (str(error).splitlines() or [""])[0][:300]
    sys.exit(f"error: rank {rank()}/{world_size()}: {type(error).__name__}: "
             f"{first_line}{at}")
