"""
What every on-policy method shares: answer prompts with the policy as it
is now, score the answers, take the reference's log-probs, check that
nothing is broken before the first update, report the update. An update
of PPO (ppo.py) or GRPO (grpo.py) reads:

    ro = sample(policy, ref, enc, next(batches), ...)  answers, log-probs
    scores = score(ro, score_fn, ...)                  the reward, no-EOS rule
    ... advantages and optimisation: what the method is ...
    rec = record(...)                                  figures of the update
    report(rec, ...)                                   evaluation, ETA, log

Online DPO (online_dpo.py) samples its pairs with `sample` too. Checks
before the first update (pi = pi_ref, no step taken) catch bugs that look
like "RL is flaky" (Huang et al. 2024): log-probs recorded while sampling
equal recomputed ones (one distribution for sampling and training), the
policy's equal the reference's (KL 0), the first ratio is 1.

The rule for an answer that runs out of budget without EOS: it is not an
answer. It scores `no_eos_score` (PPO, GRPO; None: as judged), and loses
to an ended one (online DPO). Two options of DAPO's (Yu et al. 2025):
with cache = `overlong_share` * budget > 0, (length - (budget - cache)) /
cache comes off the score of every answer longer than budget - cache (1
at the budget: an unended answer pays it in full; eq. 13), and GRPO's
`mask_unended` takes unended answers out of the loss (their scores still
set their group's baseline; TRL's mask_truncated_completions).

PPO-ptx (Ouyang et al. 2022, eq. 2): with `ptx_coef` > 0 PPO and GRPO add
ptx_coef times the NLL of a batch of pretraining text to every step's
loss, to keep what pretraining taught (the alignment tax).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dist
import kl
import tokenizer as tok
import world
from evaluate import answer, rollout_metrics
from model import autocast
from reference import response_mask, token_logprobs


@dataclass
class RLConfig:
    """The knobs PPOConfig and GRPOConfig share (defaults: cpu preset)."""
    updates: int = 80               # updates: a rollout batch, then its optimisation
    rollouts: int = 64              # answers sampled per update
    minibatch_size: int = 16        # answers per gradient step
    epochs: int = 4                 # passes over each rollout batch
    clip_eps: float = 0.2           # ratio clip (Schulman et al. 2017, eq. 7)
    lr: float = 2e-5                # policy learning rate (Adam)
    max_grad_norm: float = 1.0      # gradient norm clip
    kl_controller: str = "adaptive"  # adaptive | fixed | schedule (beta to beta_end)
    beta: float = 0.3               # KL coefficient at the start (throughout if fixed)
    beta_end: float = 0.3           # schedule: the final beta
    kl_target: float = 2.0          # adaptive: wanted KL(pi || pi_ref), nats per answer
    kl_horizon: int = 256           # adaptive: beta moves <= 20% * rollouts / horizon
    no_eos_score: float | None = -2.0  # an unended answer's score, RM units (None: RM's)
    overlong_share: float = 0.0     # DAPO's soft length penalty: over this end share of the budget
    ptx_coef: float = 0.0           # PPO-ptx: weight of pretraining's NLL in the loss
    temperature: float = 1.0        # sampling, and every log-prob
    max_new_tokens: int = 0         # response budget; 0: block_size - longest prompt
    eval_every: int = 10            # eval_fn every this many updates (and the last)
    seed: int = 0                   # prompt order, sampling, minibatches


def tolerance(device, dtype):
    """How far recomputed log-probs (and first ratios) may be from sampled
    ones: fp32 on a CPU agrees to ~1e-6; bf16 (and TF32) keeps ~3 digits."""
    exact = dtype == "fp32" and torch.device(device).type == "cpu"
    if exact:
        return {"logp": 1e-4, "ratio": 1e-5}
    return {"logp": 0.1, "ratio": 0.02}


def response_budget(enc, prompts, block_size):
    """The run's fixed response budget: block_size minus the longest
    prompt, so Dr. GRPO's normaliser never moves with a batch."""
    longest = max(len(tok.encode(enc, p)) for p in prompts)
    return block_size - longest


def seed_ranks(seed):
    """Seed the sampling (dist.rank: identical weights, different answers)."""
    torch.manual_seed(seed + dist.rank())


def start(cfg, enc, prompts, policy, n_prompts, repeat=1):
    """An RL run's setup -> (response budget, KL controller, the prompts
    of update after update, each repeated `repeat` times)."""
    dist.per_rank(n_prompts)  # a ValueError unless they split evenly (dist.py)
    seed_ranks(cfg.seed)
    block = policy.cfg.block_size
    budget = cfg.max_new_tokens or response_budget(enc, prompts, block)
    controller = kl.make_controller(cfg.kl_controller, cfg.beta, cfg.kl_target,
                                    cfg.kl_horizon, cfg.beta_end, cfg.updates)
    batches = prompt_batches(prompts, n_prompts, cfg.seed, repeat)
    return budget, controller, batches


def prompt_batches(prompts, n, seed, repeat=1):
    """Yield the next n prompts of shuffled passes (dist.shard's share),
    each `repeat` times in a row (GRPO's group, never split)."""
    gen = torch.Generator().manual_seed(seed)
    order = []
    while True:
        while len(order) < n:
            order += torch.randperm(len(prompts), generator=gen).tolist()
        mine = order[:n][dist.shard(n)]
        order = order[n:]
        yield [prompts[i] for i in mine for _ in range(repeat)]


def check_logprobs(what, a, b, mask, tol):
    """RuntimeError unless log-probs a and b agree within tol on the mask."""
    diff = torch.where(mask.bool(), a - b, 0.0).abs().max().item()
    if diff > tol:
        raise RuntimeError(f"sanity check: log-probs {what} differ by {diff:.2e}")


def check_ratio(logp, old_logp, mask, tol):
    """Before any step pi is pi_old: log ratio != 0 is a bug, not noise."""
    check_logprobs("of pi and pi_old (the ratio) before any step", logp, old_logp, mask, tol)


def minibatches(batch, size):
    """One epoch of shuffled minibatches of `size` answers (dist.per_rank's
    share) over a rollout batch {name: (B, ...) rows}."""
    mine = dist.per_rank(size)
    rows = len(next(iter(batch.values())))
    perm = torch.randperm(rows, device=batch["mask"].device)
    for start in range(0, rows, mine):
        idx = perm[start:start + mine]
        yield {k: v[idx] for k, v in batch.items()}


@torch.no_grad()
def sample(policy, ref, enc, prompts, budget, temperature, device, dtype,
           check=False):
    """One answer per prompt (at most `budget` tokens) -> dict:
    tokens (B, P+N) left-padded prompt, answer, PAD after EOS; prompt_len P;
    mask, logp, ref_logp (B, P+N-1) aligned with token_logprobs; logits,
    ref_logits (B, P+N-1, V) at the temperature; ended (B,) bool; texts
    (prompt + answer), prompts.
    check: the update-0 checks (module docstring)."""
    tokens, P, gen_logp, texts, ended = answer(policy, enc, prompts, budget, device,
                                               dtype, temperature)
    pad = tok.pad_id(enc)
    with autocast(device, dtype):
        logp, logits = token_logprobs(policy, tokens, pad, temperature,
                                      return_logits=True)
        ref_logp, ref_logits = token_logprobs(ref, tokens, pad, temperature,
                                              return_logits=True)
    mask = response_mask(tokens, P, pad)

    if check:
        tol = tolerance(device, dtype)["logp"]
        check_logprobs("recorded while sampling vs recomputed",
                       gen_logp, logp[:, P - 1:], mask[:, P - 1:], tol)
        check_logprobs("of policy vs ref = freeze(policy) at update 0",
                       logp, ref_logp, mask, tol)

    ended = torch.tensor(ended, device=device)
    return dict(tokens=tokens, prompt_len=P, mask=mask, logp=logp,
                ref_logp=ref_logp, logits=logits, ref_logits=ref_logits,
                ended=ended, texts=texts, prompts=prompts)


@torch.no_grad()
def score(ro, score_fn, cfg, budget, device, dtype):
    """Raw scores score_fn(tokens, prompt_len) (B,), kept in ro["scores"];
    returned after the rule for unended answers (module docstring)."""
    with autocast(device, dtype):
        raw = score_fn(ro["tokens"], ro["prompt_len"]).float()
    ro["scores"] = raw
    scores = raw
    if cfg.no_eos_score is not None:
        scores = torch.where(ro["ended"], raw, cfg.no_eos_score)
    if cfg.overlong_share:
        cache = cfg.overlong_share * budget
        too_long = (ro["mask"].sum(1) - (budget - cache)).clamp(min=0)
        scores = scores - too_long / cache
    return scores


def join(ros, pad_id):
    """Several rollouts (sample's dicts) as one batch: every tensor's rows
    stacked, prompts left-padded to the longest, answers right-padded."""
    P = max(ro["prompt_len"] for ro in ros)
    width = P + max(ro["tokens"].shape[1] - ro["prompt_len"] for ro in ros)
    joined = {"prompt_len": P}
    for key, value in ros[0].items():
        if isinstance(value, list):  # texts, prompts
            joined[key] = [x for ro in ros for x in ro[key]]
        elif torch.is_tensor(value):
            joined[key] = torch.cat([widen(ro, key, P, width, pad_id) for ro in ros])
    return joined


def widen(ro, key, P, width, pad_id):
    """ro[key] with columns added: the prompt's left, the answer's right.
    Tokens get PAD; masks, log-probs and logits 0 (outside every mask)."""
    x = ro[key]
    if x.dim() == 1:
        return x
    left = P - ro["prompt_len"]
    right = width - left - ro["tokens"].shape[1]
    fill = pad_id if key == "tokens" else 0
    return F.pad(x, (0, 0) * (x.dim() - 2) + (left, right), value=fill)


def take(ro, rows):
    """The rollout's rows `rows` (a LongTensor), in that order."""
    index = rows.tolist()
    picked = {k: [v[i] for i in index] if isinstance(v, list) else v[rows]
              for k, v in ro.items() if k != "prompt_len"}
    return {**ro, **picked}


def record(stage, update, ro, beta, stats, t0, gold_fn=world.gold_reward,
           valid_fn=world.is_valid):
    """An update's record: the rollout's figures (evaluate.rollout_metrics:
    kl_exact, proxy and gold reward, entropy...), beta, the optimisation's
    stats (numbers), the seconds since t0."""
    figures = rollout_metrics(ro, gold_fn, valid_fn)
    return {"stage": stage, "step": update, "beta": beta, **figures, **stats,
            "seconds": time.time() - t0}


def report(rec, policy, steps, eval_every, t_start, eval_fn, log):
    """Every method's end of a logged step (PPO, GRPO, DPO): stop on a
    non-finite loss or KL, add the ETA and, every eval_every steps and at
    the last, the held-out evaluation eval_fn(policy) as eval_*; log rec.
    -> the evaluation's figures, or None."""
    step = rec["step"]
    for key in ("loss", "policy_loss", "kl_exact"):
        if not math.isfinite(rec.get(key, 0.0)):
            raise FloatingPointError(f"{rec['stage']}: {key} became {rec[key]} "
                                     f"at step {step}")
    per_step = (time.time() - t_start) / (step + 1)
    rec["eta_s"] = per_step * (steps - step - 1)

    figures = None
    if eval_fn is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
        mode = policy.training
        figures = dict(eval_fn(policy.eval()))
        policy.train(mode)
        rec.update({f"eval_{k}": v for k, v in figures.items()})
    log(rec)
    return figures
