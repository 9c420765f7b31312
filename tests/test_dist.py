"""dist.py on this CPU: two ranks (gloo, 1 thread each) spawned by torch.multiprocessing run the same cases as
one process. One optimiser step on a fixed batch gives the same weights and figures with 2 ranks x B/2 as with
1 process x B, for SFT, the reward model, a PPO minibatch, a DPO step (one with a rank holding no pair, as
online DPO may) and a GRPO minibatch in each aggregation; whitening and GRPO's batch-std advantages over 2
ranks equal those of the whole batch. The ranks' halves hold different numbers of tokens (or pairs): a
per-rank mean would fail. Then `torchrun --nproc_per_node 2 train.py` end to end, and a rank that dies."""
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import dist
import dpo
import online_dpo
import evaluate
import grpo
import ppo
import reward
import rollout
import sft
import tokenizer as tok
import train
import world
from helpers import tiny_gpt
from model import ScalarModel, load_checkpoint
from reference import freeze, response_mask, token_logprobs, trainable
from test_train import ROOT, SHORT
from dist import weights_digest

TEXTS = ["the film was good.", "the acting was great but the music was bad.", "it was awful.",
         "i loved the cast and the music and the acting!", "the film was fine."] * 10
ANSWERS = [" was good.", " was bad.", " was great!", " was awful.", " was fine."]
# Gradient clipping off in the step cases: a clipped step hides the scale of the averaged gradient
# (an all-reduce that sums instead of averaging would pass).
NO_CLIP = 1e9


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
    cfg = sft.TrainConfig(steps=1, batch_size=4, lr=0.1, warmup=1, eval_every=1, eval_batches=1,
                          grad_clip=NO_CLIP)
    records = []
    sft.train_lm(model, lambda: (tokens, mask), lambda: (tokens, mask), cfg, log=records.append)
    return {**state(model, ""), **{k: torch.tensor(records[0][k]) for k in ("loss", "val_loss")}}


def reward_step(enc):
    """train_reward_model with one step on all 4 training prompts, of 1, 3, 6 and 10 pairs (any two of them
    have a different count from the other two), then normalisation; a 5th prompt is held out."""
    pairs = [{"prompt": p, "chosen": a, "rejected": b, "source": "policy",
              "gold_chosen": world.gold_reward(p + a), "gold_rejected": world.gold_reward(p + b)}
             for p, k in [("the music", 3), ("it", 2), ("the film", 3), ("the acting", 4), ("the cast", 5)]
             for a, b in itertools.combinations(ANSWERS[:k], 2)]
    cfg = reward.RewardConfig(steps=1, batch_size=4, lr=0.1, warmup=1, val_fraction=0.2, eval_every=1,
                              max_grad_norm=NO_CLIP)
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
    cfg = ppo.PPOConfig(epochs=1, minibatch_size=4, max_grad_norm=NO_CLIP)
    stats = ppo.optimise(policy, critic, mine, opt, cfg, pad, "cpu", "fp32")
    figures = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac")
    return {**state(policy, "policy."), **state(critic, "critic."),
            **{k: torch.tensor(stats[k]) for k in figures}}


def dpo_step(enc, none_on_rank0=False):
    """dpo.dpo_step (with the NLL term) on 5 pairs: rank 0 takes 2, of short answers, rank 1 three, longer;
    or (none_on_rank0) rank 1 all 5 and rank 0 none, as online DPO's judge may leave a rank."""
    policy = tiny_gpt(enc, seed=5, n_layer=1)
    pairs = [{"prompt": p, "chosen": a, "rejected": b} for p, a, b in [
        ("it", " was good.", " was bad."), ("the film", " was fine.", " was awful."),
        ("i loved", " the cast and the music and the acting!", " it."),
        ("the acting", " was great but the music was bad.", " was great!"),
        ("the music", " was awful.", " was good but the film was bad.")]]
    tokens, mask, _ = dpo.encode_pairs(enc, pairs, 32)
    torch.manual_seed(6)
    ref = torch.randn(5, 2) - 20
    alone = none_on_rank0 and dist.world_size() > 1 and dist.rank() == 0
    idx = torch.arange(5)[slice(0) if alone else slice(0, 5) if none_on_rank0 else dist.shard(5)]
    if len(idx):
        t, m = dpo.flatten_pairs(tokens[idx], mask[idx])
    else:  # what judged_pairs returns when it keeps no pair
        t, m = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 1)
    figures = dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), t, m,
                           torch.cat([ref[idx, 0], ref[idx, 1]]),
                           dpo.DPOConfig(sft_coef=1.0, max_grad_norm=NO_CLIP))
    return {**state(policy, ""), **{k: torch.tensor(v) for k, v in figures.items()}}


def grpo_step(enc, aggregation):
    """grpo.optimise, 1 epoch of 1 minibatch, the k3 term in the loss; each rank's rollout only as wide as its
    longest row (as on separate ranks): "constant" divides by the fixed budget, never a width."""
    policy, pad = tiny_gpt(enc, seed=7, block_size=16, n_layer=1), tok.pad_id(enc)
    torch.manual_seed(8)
    b = ppo_batch(enc)
    batch = dict(tokens=b["tokens"], mask=b["mask"], logp=b["logp"], ref_logp=torch.randn(4, 13) * 0.3,
                 advantages=torch.randn(4))
    with torch.no_grad():
        batch["logp"] = batch["logp"] + token_logprobs(policy, batch["tokens"], pad)
    mine = {k: v[dist.shard(4)] for k, v in batch.items()}
    width = int((mine["tokens"] != pad).sum(1).max())
    mine = {k: v if k == "advantages" else v[:, :width - (k != "tokens")] for k, v in mine.items()}
    cfg = grpo.GRPOConfig(epochs=1, minibatch_size=4, aggregation=aggregation, max_grad_norm=NO_CLIP)
    sums, counts = grpo.optimise(policy, mine, torch.optim.SGD(policy.parameters(), lr=0.1), cfg, 0.1, 11,
                                 pad, "cpu", "fp32")
    stats = {k: torch.tensor(v) for k, v in dist.mean_stats(sums, counts).items()}
    return {**state(policy, ""), **stats, "width": torch.tensor(width)}


def rollout_figures(enc):
    """evaluate.rollout_metrics, as PPO and GRPO log it, of 4 answers (2 per rank) of 1, 2, 7, 9 tokens."""
    torch.manual_seed(9)
    mask, (logits, ref_logits) = ppo_batch(enc)["mask"], torch.randn(2, 4, 13, 11)
    picked = torch.randint(11, (4, 13))  # the sampled tokens
    logp = lambda x: torch.log_softmax(x, -1).gather(-1, picked[..., None])[..., 0]
    ro = dict(mask=mask, logits=logits, ref_logits=ref_logits, logp=logp(logits), ref_logp=logp(ref_logits),
              scores=torch.randn(4), ended=torch.tensor([True, False, True, True]), texts=TEXTS[:4],
              prompts=[t.split()[0] for t in TEXTS[:4]])
    figures = evaluate.rollout_metrics({k: v[dist.shard(4)] for k, v in ro.items()})
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in figures.items()}


def sampled_answers(enc):
    """The first answers each RL loop samples on this rank (PPO, GRPO, online DPO), every prompt the
    same: ranks with identical weights must still sample different answers (a seed per rank)."""
    seen, sample, name = {}, rollout.sample, []

    def spy(*args, **kwargs):
        ro = sample(*args, **kwargs)
        seen.setdefault(name[-1], ro["texts"])
        return ro
    prompts, zero = ["the film"] * 8, lambda tokens, P: torch.zeros(len(tokens))
    policy, quiet = tiny_gpt(enc, seed=11, block_size=16, n_layer=1), lambda r: None
    rollout.sample = spy
    try:
        name.append("ppo")
        ppo.train_ppo(trainable(policy), freeze(policy), zero, ScalarModel(policy), enc, prompts,
                      ppo.PPOConfig(updates=1, rollouts=4, minibatch_size=4, max_new_tokens=6), log=quiet)
        name.append("grpo")
        grpo.train_grpo(trainable(policy), freeze(policy), zero, enc, prompts,
                        grpo.GRPOConfig(updates=1, rollouts=8, group_size=2, minibatch_size=4,
                                        max_new_tokens=6), log=quiet)
        name.append("dpo_online")
        online_dpo.train_online_dpo(trainable(policy), freeze(policy), enc, prompts, lambda a, *_: [True] * len(a),
                             dpo.DPOConfig(steps=1, batch_size=4, max_new_tokens=6), log=quiet)
    finally:
        rollout.sample = sample
    return seen


def dynamic_sampling(enc):
    """grpo.train_grpo with DAPO's dynamic sampling where rank 0's groups always tie (it resamples up to the
    cap at every update) and rank 1's never do: the ranks resample different numbers of times, so no
    collective may sit in the resampling loop, or this would hang."""
    policy = tiny_gpt(enc, seed=13, block_size=16, n_layer=1)
    ties = dist.rank() == 0
    score_fn = lambda tokens, P: torch.zeros(len(tokens)) if ties else torch.rand(len(tokens))
    cfg = grpo.GRPOConfig(updates=2, rollouts=8, group_size=2, minibatch_size=4, max_new_tokens=6,
                          no_eos_score=None, dynamic_sampling=True, max_resampled=3)
    trained, history = grpo.train_grpo(trainable(policy), freeze(policy), score_fn, enc, ["the film"] * 8, cfg,
                                       log=lambda r: None)
    return {"resampled": [h["resampled"] for h in history], "digest": weights_digest(trained)}


def preference_pairs(enc):
    """train.reward_stage where each rank's annotators label the pairs differently (rank 1 flips
    every label): every rank must train on rank 0's pairs, or offline DPO's steps would differ."""
    pairs = [{"prompt": p, "chosen": a, "rejected": b, "source": "policy", "gold_chosen": 0.0,
              "gold_rejected": 0.0} for p in ("the music", "it", "the film", "the acting", "the cast")
             for a, b in itertools.combinations(ANSWERS[:3], 2)]
    if dist.rank() == 1:
        pairs = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    make = reward.make_preferences
    reward.make_preferences = lambda *args, **kwargs: (pairs, dist.rank())
    env = SimpleNamespace(data={"train_prompts": []}, device="cpu", dtype="fp32",
                          args=SimpleNamespace(seed=0, data=None), gold_fn=world.gold_reward)
    rcfg = reward.RewardConfig(steps=1, batch_size=2, val_fraction=0.2)
    try:
        _, result = train.reward_stage(env, enc, tiny_gpt(enc, seed=12, n_layer=1), rcfg,
                                       lambda r: None)
    finally:
        reward.make_preferences = make
    return {"pairs": result["pairs"], "n_unended": result["n_unended_answers"]}


def cases():
    """Every case, the same code in one process (the reference) and on each rank: {case: {name: tensor}}."""
    torch.manual_seed(0)
    enc = tok.train_tokenizer(TEXTS, 300)
    x, mask, scores = torch.randn(4, 10) * 3 + 1, ppo_batch(enc, W=11)["mask"], torch.randn(8) * 2
    mine, adamw = dist.shard(4), sft.adamw
    sft.adamw = reward.adamw = sgd
    try:
        steps = {f"grpo_{agg}": grpo_step(enc, agg) for agg in ("sequence", "token", "constant")}
        widths = [steps[case].pop("width") for case in steps]  # this rank's own: not to compare
        return {"sft": sft_step(enc), "reward": reward_step(enc), "ppo": ppo_step(enc), "dpo": dpo_step(enc),
                "dpo_rank_without_pairs": dpo_step(enc, none_on_rank0=True), **steps,
                "rollout_metrics": rollout_figures(enc), "answers": sampled_answers(enc),
                "preference_pairs": preference_pairs(enc), "dynamic_sampling": dynamic_sampling(enc),
                "whiten": {"rows": ppo.whiten(x[mine], mask[mine]), "mask": mask[mine]},
                "grpo_batch_std": {"rows": grpo.group_advantages(scores[dist.shard(8)], 2, "batch")},
                "shard": {"rows": torch.tensor([dist.shard(5).start, dist.shard(5).stop]),
                          "widths": widths[0]}}
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
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"{out}/threads{rank}.txt", "w") as f:  # gloo's threads left after close
        f.write("\n".join(t for t in threads if "gloo" in t))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(the cases in this process, [the cases on rank 0, on rank 1])."""
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=2)
    leftover = [open(f"{out}/threads{r}.txt").read() for r in range(2)]
    return cases(), [{**torch.load(f"{out}/rank{r}.pt"), "gloo_threads": leftover[r]} for r in range(2)]


def test_one_process_never_touches_torch_distributed():
    assert "WORLD_SIZE" not in os.environ
    assert dist.init() == (0, 1) and not torch.distributed.is_initialized()
    x = torch.tensor([1.0, 2.0])
    assert dist.all_sum(x) is x and dist.share(torch.tensor(3)) == 1.0 and dist.shard(5) == slice(0, 5)
    assert dist.all_max(x) is x and dist.gather("text") == ["text"] and dist.per_rank(6) == 6
    dist.barrier(), dist.close(), dist.average_gradients([])


@pytest.mark.parametrize("case", ["sft", "reward", "ppo", "dpo", "dpo_rank_without_pairs", "grpo_sequence",
                                  "grpo_token", "grpo_constant", "rollout_metrics"])
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


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_close_leaves_no_gloo_thread_behind(results):
    """After dist.close no gloo thread may outlive the group: one still releasing a tensor when the
    interpreter shuts down aborts the rank ("terminate called without an active exception"), the
    end-to-end torchrun test's old one-in-40 flake. The ranks here built optimisers (which import
    torch.distributed.nn after init) as train.py does."""
    _, ranks = results
    assert [r["gloo_threads"] for r in ranks] == ["", ""]


def test_ranks_sample_different_answers_in_every_rl_loop(results):
    single, ranks = results
    for loop in ("ppo", "grpo", "dpo_online"):
        answers = [r["answers"][loop] for r in ranks]
        assert len(set(answers[0])) > 1, loop  # the policy does sample varied answers
        assert answers[0] != answers[1], loop


def test_ranks_resampling_different_numbers_of_times_finish_in_step(results):
    """Rank 0 drew 3 fresh groups per update (its cap), rank 1 none: both finished both updates with the
    same weights, and log the global share, 3 of 4 groups, as one process with rank 0's ties does."""
    single, ranks = results
    assert ranks[0]["dynamic_sampling"]["digest"] == ranks[1]["dynamic_sampling"]["digest"]
    for r in (single, *ranks):
        assert r["dynamic_sampling"]["resampled"] == [0.75, 0.75]


def test_every_rank_trains_on_rank_0s_preference_pairs(results):
    single, ranks = results
    assert ranks[0]["preference_pairs"] == ranks[1]["preference_pairs"]
    assert ranks[1]["preference_pairs"]["n_unended"] == 0  # rank 0's, not rank 1's own
    assert ranks[0]["preference_pairs"] == single["preference_pairs"]


def test_whitening_over_two_ranks_equals_whitening_the_whole_batch(results):
    single, ranks = results
    for case in ("whiten", "grpo_batch_std"):
        torch.testing.assert_close(torch.cat([r[case]["rows"] for r in ranks]), single[case]["rows"],
                                   atol=1e-6, rtol=1e-6, msg=case)
    assert [r["shard"]["rows"].tolist() for r in ranks] == [[0, 2], [2, 5]]
    assert [r["shard"]["widths"].item() for r in ranks] == [5, 12]  # GRPO's ranks' rollouts' widths


# ----------------------------------------------------------------------------- torchrun end to end
STAGES = ["pretrain", "sft", "reward_model", "ppo", "ppo_beta0", "grpo", "dpo", "dpo_online"]
SAME = re.compile(r"^(\w+): the same weights on all 2 ranks \(sha256 (\w+)\)$", re.M)
# A test-only watcher, put on the ranks' path as sitecustomize: every file a rank opens for writing, creates,
# renames or removes under LEASH_OUT is listed in LEASH_WRITES.<rank> (Python's audit hooks see them all).
WATCHER = '''import os, sys
out, log = os.environ.get("LEASH_OUT"), os.environ.get("LEASH_WRITES", "") + "." + os.environ.get("RANK", "x")
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        writes = args[1] and any(c in args[1] for c in "wax+") or args[1] is None and args[2] & (os.O_WRONLY
                 | os.O_RDWR | os.O_CREAT)
    else:
        writes = event in ("os.rename", "os.mkdir", "os.remove")
    if writes and os.path.realpath(args[0]).startswith(os.path.realpath(out) + os.sep):
        with open(log, "a") as f:
            f.write(f"{event} {args[0]}\\n")
if out and "RANK" in os.environ:
    sys.addaudithook(hook)
'''


def torchrun(out, flags, env=None, **kwargs):
    """`torchrun --standalone --nproc_per_node 2 train.py --preset tiny --device cpu`, 1 thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--preset", "tiny", "--device", "cpu", "--out", out, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_torchrun_two_ranks_end_to_end(tmp_path, dtype_flag):
    """Every stage on 2 ranks: after each, the ranks' weights are identical (train.py gathers their digests
    and prints the common one, which must be that of rank 0's checkpoint); rank 0 alone wrote files, each
    record once (a watcher sees every rank's writes); summary.json has every key. A re-run reuses every stage,
    on both ranks (a rank that trained instead would wait for the other at its first all-reduce)."""
    out, hook = str(tmp_path / "out"), tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WATCHER)
    env = {"PYTHONPATH": str(hook), "LEASH_OUT": out, "LEASH_WRITES": str(tmp_path / "writes")}
    p = torchrun(out, SHORT + ["--algo", "all"] + dtype_flag, env)
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    digests = dict(SAME.findall(log))
    assert list(digests) == STAGES, log[-3000:]
    for name in STAGES:
        assert weights_digest(load_checkpoint(f"{out}/{name}.pt")[0]).startswith(digests[name]), name
    writes = {r: (tmp_path / f"writes.{r}").read_text() for r in "01" if (tmp_path / f"writes.{r}").exists()}
    assert set(writes) == {"0"} and f"{out}/summary.json" in writes["0"], writes  # it saw rank 0's
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names}
    assert files == {"tokenizer.json", "metrics.jsonl", "summary.json", "samples.md", "plots/hacking.png",
                     *(f"plots/{n}.png" for n in STAGES[3:]), *(f"{n}.pt" for n in STAGES),
                     *(f"stages/{n}.json" for n in ["tokenizer", *STAGES])}
    records = [(r["stage"], r["step"]) for r in map(json.loads, open(f"{out}/metrics.jsonl"))]
    assert len(records) == len(set(records)) and records[0] == ("run", 0)
    assert [step for stage, step in records if stage == "ppo"] == [0, 1, 2, 3]
    summary = json.load(open(f"{out}/summary.json"))
    assert {"config", "device", "seconds"} <= set(summary)
    assert {"val_loss", "valid_rate", "gold_reward", "distinct_2"} <= set(summary["sft"])
    assert {"val_accuracy", "gold_label_accuracy"} <= set(summary["reward_model"])
    for name in ("ppo", "grpo"):
        assert {"gold_reward", "proxy_reward", "kl", "kl_target", "beta_final", "valid_rate", "distinct_2",
                "seconds"} <= set(summary[name]), name
    for name in ("dpo", "dpo_online"):
        assert {"gold_reward", "proxy_reward", "kl", "valid_rate", "distinct_2", "implicit_accuracy",
                "seconds"} <= set(summary[name]), name
    p = torchrun(out, SHORT + ["--algo", "all"] + dtype_flag)
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-3000:]
    assert all(f"{name}: reusing" in log for name in ["tokenizer", *STAGES])
    assert dict(SAME.findall(log)) == digests


def test_a_failing_rank_stops_the_run_with_one_line_naming_it(tmp_path):
    """Rank 0 alone writes, so an --out it cannot create fails on rank 0 only: one line says so, and torchrun
    ends rank 1 (waiting at the first stage's barrier)."""
    (tmp_path / "a_file").write_text("")
    p = torchrun(str(tmp_path / "a_file" / "out"), SHORT)
    log = p.communicate(timeout=120)[0]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1, log[-3000:]
    assert re.match(r"error: rank 0/2: \w+Error: .*a_file.* \(train\.py:\d+\)$", errors[0]), errors


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="/proc")
def test_a_killed_rank_ends_the_run_within_60_s(tmp_path):
    """SIGKILL rank 1 during pretraining: it cannot say a word, so torchrun's one line names it ("failed
    (exitcode: -9) local_rank: 1"); rank 0, whose all-reduce breaks, is ended by torchrun without blaming
    itself; the run exits non-zero well within 60 s."""
    p = torchrun(str(tmp_path / "out"), ["--algo", "ppo"])
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(" pretrain "):  # training is under way on both ranks
            break
    ranks = {}
    for pid in map(int, open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()):
        for var in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            if var.startswith(b"RANK="):
                ranks[int(var[5:])] = pid
    t0 = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    lines += p.communicate(timeout=60)[0].splitlines()
    assert p.returncode != 0 and time.time() - t0 < 60
    assert len([line for line in lines if "failed (exitcode: -9) local_rank: 1 " in line]) == 1, lines[-40:]
    assert not [line for line in lines if line.startswith("error:")], lines[-40:]
