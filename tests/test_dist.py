"""dist.py on this CPU: two ranks (gloo, 1 thread each) spawned by torch.multiprocessing run the same cases as
one process. One optimiser step on a fixed batch gives the same weights and figures with 2 ranks x B/2 as with
1 process x B, for SFT, the reward model and a PPO minibatch; whitening over 2 ranks equals whitening over the
whole batch. The ranks' halves hold different numbers of tokens (or pairs): a per-rank mean would fail."""
import itertools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dist
import ppo
import reward
import sft
import tokenizer as tok
import world
from helpers import tiny_gpt
from model import ScalarModel
from reference import response_mask, token_logprobs

TEXTS = ["the film was good.", "the acting was great but the music was bad.", "it was awful.",
         "i loved the cast and the music and the acting!", "the film was fine."] * 10
ANSWERS = [" was good.", " was bad.", " was great!", " was awful.", " was fine."]


def sgd(params, device, lr, **_):
    """Plain SGD in model.adamw's place: a step proportional to the gradient, so these tests see gradients.
    Adam's first step is about lr * sign(gradient): blind to a gradient's scale, and fp32 noise in a gradient
    that is 0 in theory (the reward head's bias: BT sees only differences) becomes a step of lr."""
    return torch.optim.SGD(params, lr=lr)


def state(model, prefix):
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def sft_step(enc):
    """train_lm's one step: two short completions (rank 0's half) and two long ones (rank 1's)."""
    model = tiny_gpt(enc, seed=1, n_layer=1)
    pairs = [("the film", " was good."), ("it", " was bad."),
             ("the acting", " was great but the music was bad."), ("i loved", " the cast and the acting!")]
    tokens, mask, _ = tok.encode_batch(enc, *zip(*pairs), 32)
    cfg, records = sft.TrainConfig(steps=1, batch_size=4, lr=0.1, warmup=1, eval_every=1, eval_batches=1), []
    sft.train_lm(model, lambda: (tokens, mask), lambda: (tokens, mask), cfg, log=records.append)
    return {**state(model, ""), **{k: torch.tensor(records[0][k]) for k in ("loss", "val_loss")}}


def reward_step(enc):
    """train_reward_model with one step on all 4 training prompts, of 1, 3, 6 and 10 pairs (any two of them
    have a different count from the other two), then normalisation; a 5th prompt is held out."""
    pairs = [{"prompt": p, "chosen": a, "rejected": b, "source": "policy",
              "gold_chosen": world.gold_reward(p + a), "gold_rejected": world.gold_reward(p + b)}
             for p, k in [("the music", 3), ("it", 2), ("the film", 3), ("the acting", 4), ("the cast", 5)]
             for a, b in itertools.combinations(ANSWERS[:k], 2)]
    cfg = reward.RewardConfig(steps=1, batch_size=4, lr=0.1, warmup=1, val_fraction=0.2, eval_every=1)
    records = []
    rm, metrics = reward.train_reward_model(tiny_gpt(enc, seed=2, n_layer=1), enc, pairs, cfg, "cpu",
                                            log=records.append)
    figures = {k: records[0][k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    return {**state(rm, ""), **{k: torch.tensor(v) for k, v in figures.items()},
            "train_accuracy": torch.tensor(metrics["train_accuracy"])}


def ppo_batch(enc, B=4, P=3, W=14, lengths=(1, 2, 7, 9)):
    """A fixed rollout batch (tokens (B, W); logp, values, advantages, returns, mask (B, W-1)) whose rows
    answer in `lengths` tokens; logp: noise, to add to the policy's, so that some ratios are clipped."""
    pad = tok.pad_id(enc)
    tokens = torch.randint(0, 256, (B, W))
    for row, n in enumerate(lengths):
        tokens[row, P + n:] = pad
    mask = response_mask(tokens, P, pad)
    return dict(tokens=tokens, mask=mask, logp=torch.randn(B, W - 1) * 0.3 * mask,
                values=torch.randn(B, W - 1) * mask, advantages=torch.randn(B, W - 1) * mask,
                returns=torch.randn(B, W - 1) * mask)


def ppo_step(enc):
    """ppo.optimise, 1 epoch of 1 minibatch (plain SGD: a step proportional to the gradient)."""
    policy = tiny_gpt(enc, seed=3, block_size=16, n_layer=1)
    critic = ScalarModel(policy, head_std=0.1)
    pad = tok.pad_id(enc)
    torch.manual_seed(4)
    batch = ppo_batch(enc)
    with torch.no_grad():
        batch["logp"] += token_logprobs(policy, batch["tokens"], pad)
    opt = torch.optim.SGD([{"params": list(m.parameters())} for m in (policy, critic)], lr=0.1)
    mine = {k: v[dist.shard(len(v))] for k, v in batch.items()}
    stats = ppo.optimise(policy, critic, mine, opt, ppo.PPOConfig(ppo_epochs=1, minibatch_size=4), pad, "cpu",
                         "fp32")
    figures = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac")
    return {**state(policy, "policy."), **state(critic, "critic."),
            **{k: dist.all_mean(torch.as_tensor(stats[k])) for k in figures}}


def cases():
    """Every case, the same code in one process (the reference) and on each rank: {case: {name: tensor}}."""
    torch.manual_seed(0)
    enc = tok.train_tokenizer(TEXTS, 300)
    x, mask = torch.randn(4, 10) * 3 + 1, ppo_batch(enc, W=11)["mask"]
    mine, adamw = dist.shard(4), sft.adamw
    sft.adamw = reward.adamw = sgd
    try:
        return {"sft": sft_step(enc), "reward": reward_step(enc), "ppo": ppo_step(enc),
                "whiten": {"rows": ppo.whiten(x[mine], mask[mine]), "mask": mask[mine]},
                "shard": {"rows": torch.tensor([dist.shard(5).start, dist.shard(5).stop])}}
    finally:
        sft.adamw = reward.adamw = adamw


def worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    assert dist.init("cpu") == (rank, 2) and dist.is_main() == (rank == 0)
    try:
        torch.save(cases(), f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(the cases in this process, [the cases on rank 0, on rank 1])."""
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=2)
    return cases(), [torch.load(f"{out}/rank{r}.pt") for r in range(2)]


def test_one_process_never_touches_torch_distributed():
    assert "WORLD_SIZE" not in os.environ
    assert dist.init() == (0, 1) and not torch.distributed.is_initialized()
    x = torch.tensor([1.0, 2.0])
    assert dist.all_sum(x) is x and dist.rank_weight(torch.tensor(3)) == 1.0 and dist.shard(5) == slice(0, 5)
    dist.barrier(), dist.close(), dist.average_gradients([])


@pytest.mark.parametrize("case", ["sft", "reward", "ppo"])
def test_one_step_on_two_ranks_equals_one_process(results, case):
    single, ranks = results
    assert single[case].keys() == ranks[0][case].keys() == ranks[1][case].keys()
    for name, value in single[case].items():
        assert torch.equal(ranks[0][case][name], ranks[1][case][name]), name  # the ranks never drift apart
        torch.testing.assert_close(ranks[0][case][name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_a_mean_per_rank_would_fail(results):
    """What makes the tests above able to fail: the ranks' halves hold different numbers of tokens, so the
    average of the two halves' means (each rank's mean, gradients averaged) is not the mean of the batch."""
    _, ranks = results
    counts = [r["whiten"]["mask"].sum().item() for r in ranks]
    assert counts[0] != counts[1]
    torch.manual_seed(0)
    x, mask = torch.randn(4, 13), ppo_batch(tok.train_tokenizer(TEXTS, 300))["mask"]  # PPO's batch's mask
    halves = (ppo.masked_mean(x[:2], mask[:2]) + ppo.masked_mean(x[2:], mask[2:])) / 2
    assert (halves - ppo.masked_mean(x, mask)).abs() > 0.1


def test_whitening_over_two_ranks_equals_whitening_the_whole_batch(results):
    single, ranks = results
    torch.testing.assert_close(torch.cat([r["whiten"]["rows"] for r in ranks]), single["whiten"]["rows"],
                               atol=1e-6, rtol=1e-6)
    assert [r["shard"]["rows"].tolist() for r in ranks] == [[0, 2], [2, 5]]
