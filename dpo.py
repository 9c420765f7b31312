"""DPO: the KL-penalised RLHF objective with no critic; offline no reward model or sampler (online: both).

PPO maximises E_{y~pi}[r(x, y)] - beta * KL(pi || pi_ref), whose optimum is (Rafailov et al. 2023, eq. 4)
    pi*(y|x) = pi_ref(y|x) * exp(r(x, y) / beta) / Z(x),
so every policy is optimal for r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x). In the
Bradley-Terry likelihood of the labels Z cancels in chosen - rejected: fitting that reward to the
preferences IS training the policy, supervised, on the reward model's pairs, against PPO's frozen reference.
Offline (train_dpo) the pairs are the SFT policy's answers, labelled once; online (train_online_dpo, Guo et
al. 2024, "Direct Language Model Alignment from Online AI Feedback"), the policy's own, judged as it goes."""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dist
import tokenizer as tok
from model import adamw, autocast
from reference import response_mask, token_logprobs
from reward import score
from sft import lr_at


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """(B,) log-probs of whole answers (summed over their tokens, EOS included) under policy and reference
    -> (losses, chosen_rewards, rejected_rewards), each (B,) fp32, rewards detached. With the margin
        h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]:
      "sigmoid"  -log sigmoid(beta h)       Rafailov et al. 2023, eq. 7 (DPO). label_smoothing eps > 0
                 trusts the label with probability 1 - eps (conservative DPO, Mitchell 2023): -(1 - eps) log
                 sigmoid(beta h) - eps log sigmoid(-beta h), optimal at beta h = log((1 - eps) / eps).
      "ipo"      (h - 1 / (2 beta))^2       Azar et al. 2023, eq. 17 (IPO): regress the margin onto a fixed
                 target, not up without end. Log-probs summed (the paper) or, given chosen_lengths,
                 rejected_lengths (B,), averaged per token (TRL: the same beta asks ~length x the margin).
    beta is the objective's KL coefficient: when large, a small log-ratio is already a big reward, the loss
    saturates (sigmoid) or the target shrinks to 0 (ipo), and pi stays near pi_ref; small: pi must move far.
    Only the margin of the implicit rewards beta (log pi - log pi_ref) enters the loss, so the chosen one
    can fall while training succeeds: beta = 0.1, log pi(y_w) -20 -> -22, log pi(y_l) -20 -> -26 give
    rewards -0.2, -0.6: margin +0.4, loss 0.51 < log 2; both lost probability, to answers nobody compared."""
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        if chosen_lengths is not None:
            raise ValueError("per-token averaging (chosen_lengths) applies to the ipo loss only")
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only; IPO has a finite target")
        if chosen_lengths is not None:
            h = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (choose 'sigmoid' or 'ipo')")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def encode_pairs(enc, pairs, block_size):
    """Pairs {"prompt", "chosen", "rejected"} -> tokens (N, 2, T), mask (N, 2, T-1), n_dropped. Along dim 1:
    0 chosen, 1 rejected, each prompt + completion + EOS, right-padded (tokenizer.encode_batch: mask 1 on
    completion and EOS targets). Pairs with a side too long for block_size are dropped, counted, never cut."""
    n, completions = len(pairs), [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    tokens, mask, keep = tok.encode_batch(enc, [p["prompt"] for p in pairs] * 2, completions, block_size)
    row = {i: r for r, i in enumerate(keep)}
    both = [[row[i], row[i + n]] for i in range(n) if i in row and i + n in row]
    idx = torch.tensor(both, dtype=torch.long).view(-1, 2)  # (pairs kept, 2): rows of chosen, rejected
    return tokens[idx], mask[idx], n - len(idx)


def flatten_pairs(tokens, mask):
    """(B, 2, T), (B, 2, T-1) -> (2B, T'), (2B, T'-1): all chosen rows, then all rejected rows, for one
    forward pass; columns after the batch's last response token (padding) are cut."""
    T = int(mask.sum((0, 1)).nonzero().max()) + 2  # the last target (an EOS) is token T-1
    return torch.cat([tokens[:, 0], tokens[:, 1]])[:, :T], torch.cat([mask[:, 0], mask[:, 1]])[:, :T - 1]


def sequence_logps(model, tokens, mask, pad_id=None):
    """(N,) fp32 summed log-probs of the masked (response) targets of rows (N, T); pad_id: left padding."""
    return (token_logprobs(model, tokens, pad_id) * mask).sum(1)


@torch.inference_mode()
def pair_logps(model, tokens, mask, device="cpu", dtype="fp32", batch_size=256):
    """(N, 2) summed log-probs of pairs (N, 2, T), chosen and rejected: the reference's, once before
    training (same path and autocast as the policy's, so equal at step 0), or the policy's for accuracy."""
    out = []
    with autocast(device, dtype):
        for i in range(0, len(tokens), batch_size):
            t, m = flatten_pairs(tokens[i:i + batch_size], mask[i:i + batch_size])
            out.append(sequence_logps(model, t.to(device), m.to(device)).float().cpu().view(2, -1).T)
    return torch.cat(out)


@dataclass
class DPOConfig:
    beta: float = 0.1             # KL coefficient of the implicit objective
    loss_type: str = "sigmoid"    # "sigmoid" (DPO) or "ipo"
    ipo_per_token: bool = False   # ipo: average the log-ratios per token (TRL) instead of summing
    label_smoothing: float = 0.0  # conservative DPO: the assumed label-flip rate
    sft_coef: float = 1.0         # + this x NLL per token of the chosen answers (RPO; 0: plain DPO)
    sources: str = "policy"       # "policy" (the SFT policy's answers) or "all" (+ world reviews and slips)
    epochs: float = 1.0           # passes over the pairs...
    max_steps: int = 400          # ...but at most this many steps
    batch_size: int = 32          # preference pairs per step (2x rows through the model); online: prompts
    lr: float = 2e-4              # AdamW, no weight decay (it pulls towards 0, not towards pi_ref)
    warmup: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 100         # steps between eval_fn calls (slow: it samples)
    log_every: int = 10
    seed: int = 0
    online_steps: int = 80        # online: 32 prompts x 2 answers x 80 = PPO's 64 x 80 reward-model calls
    sample_every: int = 1         # online: 1; k > 1: iterative DPO, k steps on the pairs sampled at the first
    max_new_tokens: int = 0       # online answers' budget in tokens; 0: up to block_size


def dpo_step(policy, opt, tokens, mask, ref_logps, cfg, device="cpu", dtype="fp32", pad_id=None):
    """One step on n pairs: tokens (2n, T), the chosen rows then the rejected ones (pad_id: left-padded), mask
    (2n, T-1) on their responses, ref_logps (2n,) the reference's. loss = mean dpo_loss + sft_coef x NLL per
    token of the chosen (RPO, Pang et al. 2024: keep them likely, not lost to unrated, often invalid text).
    -> detached 0-d figures from before the step, of every rank: loss, chosen_reward, margin, accuracy..."""
    n, n_tok = len(tokens) // 2, mask.sum(1)
    with autocast(device, dtype):
        logps = sequence_logps(policy, tokens, mask, pad_id)
    lengths = (n_tok[:n], n_tok[n:]) if cfg.ipo_per_token else (None, None)
    losses, r_w, r_l = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], cfg.beta, cfg.loss_type,
                                cfg.label_smoothing, *lengths)
    w = dist.rank_weight(torch.tensor(n, device=logps.device))  # data-parallel: this rank's pairs' share
    mean = lambda x: (x.float().mean() if n else x.float().sum()) * w  # none here: 0, in the gradient average
    nll = -logps[:n].sum() / n_tok[:n].sum().clamp(min=1) * dist.rank_weight(n_tok[:n].sum())  # per token
    loss = mean(losses) + cfg.sft_coef * nll
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients(policy.parameters())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    opt.step()
    figures = dict(loss=loss.detach(), chosen_reward=mean(r_w), rejected_reward=mean(r_l),
                   margin=mean(h := r_w - r_l), accuracy=mean(h > 0), chosen_nll=nll.detach())
    return dict(zip(figures, dist.all_mean(torch.stack(list(figures.values()))).unbind()))


def dpo_loop(policy, stage, steps, next_batch, figures, cfg, device, dtype, log, eval_fn, pad_id=None):
    """Offline and online DPO but for where pairs come from: `steps` dpo_steps on next_batch(step) -> (tokens,
    mask, ref_logps) (no pair: no step, no figures), lr warmup then cosine. log(record) every log_every steps
    and at each eval (every eval_every steps, the last): dpo_step's figures, lr, figures(step), eval_fn's
    as eval_*. -> (records, the last eval dict, ranked: per step (accuracy before the step, pairs))."""
    opt = adamw(policy.parameters(), device, cfg.lr)
    records, last_eval, ranked, n_pairs, t0 = [], {}, [], 0, time.time()
    for step in range(steps):
        tokens, mask, ref_logps = next_batch(step)
        n = int(dist.all_sum(torch.tensor(len(tokens) // 2, device=device)))  # every rank's pairs
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup)
        stats = dpo_step(policy, opt, tokens, mask, ref_logps, cfg, device, dtype, pad_id) if n else {}
        ranked, n_pairs = ranked + [(stats.get("accuracy"), n)], n_pairs + n
        evaluate = step == steps - 1 or (step + 1) % cfg.eval_every == 0
        if step % cfg.log_every == 0 or evaluate:
            elapsed, stats = time.time() - t0, {k: v.item() for k, v in stats.items()}
            if n and not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"{stage}: loss became {stats['loss']} at step {step}")
            rec = {"stage": stage, "step": step, **stats, "lr": opt.param_groups[0]["lr"], **figures(step),
                   "pairs_per_s": n_pairs / elapsed, "eta_s": elapsed / (step + 1) * (steps - step - 1)}
            if evaluate and eval_fn is not None:
                mode, last_eval = policy.training, dict(eval_fn(policy.eval()))
                rec.update({f"eval_{k}": v for k, v in last_eval.items()})
                policy.train(mode)
            records.append(rec)
            log(rec)
    return records, last_eval, ranked


def implicit_accuracy(policy, tokens, mask, ref_logps, device="cpu", dtype="fp32"):
    """Share of pairs whose implicit reward beta * (log pi - log pi_ref) (any beta > 0) favours the chosen."""
    ratio = pair_logps(policy, tokens, mask, device, dtype) - ref_logps
    return (ratio[:, 0] > ratio[:, 1]).float().mean().item()


def train_dpo(policy, ref, enc, pairs, cfg: DPOConfig, device="cpu", dtype="fp32", log=print,
              eval_fn=None, val_pairs=None):
    """Train `policy` in place with DPO -> (policy, history). ref: the frozen reference (None: the policy as
    it is now), its log-probs computed once (data-parallel: on this rank's share of each step's pairs only).
    cfg.sources "policy" keeps pairs with "source" "policy" (or none). log(dict) gets dpo_loop's records, the
    last with val_accuracy (implicit accuracy on val_pairs). history: {"records", "eval" (last eval_fn dict),
    "implicit_accuracy" (None without val_pairs), "seconds", "n_pairs" (used), "n_dropped", "epochs"}."""
    if cfg.sources not in ("policy", "all"):
        raise ValueError(f"DPOConfig.sources {cfg.sources!r}: use 'policy' or 'all'")
    pairs = [p for p in pairs if cfg.sources == "all" or p.get("source", "policy") == "policy"]
    ref, t_start, gen = policy if ref is None else ref, time.time(), torch.Generator().manual_seed(cfg.seed)
    tokens, mask, dropped = encode_pairs(enc, pairs, policy.cfg.block_size)
    B, n_all = cfg.batch_size, len(tokens)
    steps = min(math.ceil(cfg.epochs * n_all / B), cfg.max_steps)
    if steps * B < n_all:  # a random subset suffices; the reference need not see the rest
        keep = torch.randperm(n_all, generator=gen)[:steps * B]
        tokens, mask = tokens[keep], mask[keep]
    order = torch.cat([torch.randperm(len(tokens), generator=gen)  # epochs: every pair once, then again
                       for _ in range(math.ceil(steps * B / len(tokens)))])
    batch = lambda step: order[step * B:(step + 1) * B][dist.shard(B)]  # this rank's pairs of a step's
    mine, ref_logps = torch.cat([batch(s) for s in range(steps)]).unique(), torch.zeros(len(tokens), 2)
    ref_logps[mine] = pair_logps(ref, tokens[mine], mask[mine], device, dtype)  # the reference: once
    if val_pairs:  # every rank judges all of them
        val_tokens, val_mask, _ = encode_pairs(enc, val_pairs, policy.cfg.block_size)
        val = (val_tokens, val_mask, pair_logps(ref, val_tokens, val_mask, device, dtype))

    def next_batch(step):
        idx = batch(step)
        t, m = (x.to(device) for x in flatten_pairs(tokens[idx], mask[idx]))
        return t, m, torch.cat([ref_logps[idx, 0], ref_logps[idx, 1]]).to(device)
    figures = lambda step: {"epoch": (step + 1) * B / n_all, **({"val_accuracy": implicit_accuracy(
        policy.eval(), *val, device, dtype)} if val_pairs and step == steps - 1 else {})}  # held out, at last
    records, last_eval, _ = dpo_loop(policy.train(), "dpo", steps, next_batch, figures, cfg, device, dtype,
                                     log, eval_fn)
    return policy.eval(), dict(records=records, eval=last_eval, implicit_accuracy=records[-1].get(
        "val_accuracy"), seconds=time.time() - t_start, n_pairs=len(tokens), n_dropped=dropped,
        epochs=steps * B / n_all)


def reward_model_judge(rm, pad_id):
    """The default judge (train_online_dpo): the reward model PPO maximises; the higher reward.score wins."""
    return lambda texts_a, texts_b, tokens_a, tokens_b, prompt_len: torch.sub(
        *score(rm, torch.cat([tokens_a, tokens_b]), pad_id).view(2, -1))  # one forward: a's rows, then b's


def label_pairs(pref, same, ended):
    """Verdicts pref (B,) on pairs (a, b) = rows (i, B + i) of 2B answers, same (B,): identical answers, ended
    (2B,) -> (pairs (n, 2): rows of each kept chosen, rejected; n_tie, n_unended). Skipped: a pair with an
    answer cut off by the budget (not an answer), a tie (judge's, or identical: h = 0 whatever pi, no use)."""
    pref = torch.as_tensor(pref).cpu()
    pref = pref.float() * 2 - 1 if pref.dtype == torch.bool else pref.float()
    a, B = torch.arange(len(pref)), len(pref)
    unended = ~(ended[:B] & ended[B:]).cpu()
    tie = ~unended & ((pref == 0) | same.cpu())
    pairs = torch.stack([torch.where(pref > 0, a, a + B), torch.where(pref > 0, a + B, a)], 1)
    return pairs[~(unended | tie)], int(tie.sum()), int(unended.sum())


@torch.no_grad()
def judged_pairs(policy, ref, judge, enc, prompts, cfg, device="cpu", dtype="fp32", generator=None,
                 check=False):
    """Two answers per prompt from `policy` (temperature 1, KV cache), judged, the usable kept (label_pairs)
    -> dict: tokens (2n, T) prompt (left-padded) + answer + PAD, the chosen rows then the rejected; mask;
    ref_logps (2n,) (a reference forward: new answers); n_tie; n_unended. check (pi = pi_ref): RuntimeError
    unless sampled, recomputed and reference log-probs agree per token (ppo's update-0 checks)."""
    pad, B = tok.pad_id(enc), len(prompts)
    prompt = tok.left_pad([tok.encode(enc, p) for p in prompts] * 2, pad).to(device)  # rows i, B + i: i
    P, block = prompt.shape[1], policy.cfg.block_size
    with autocast(device, dtype, sampling=True):
        tokens, gen_logp = policy.generate(prompt, min(cfg.max_new_tokens or block, block - P),
                                           tok.eos_id(enc), pad, generator=generator)
    answers, ended = tok.decode_responses(enc, tokens, P)
    texts, mask = [p + a for p, a in zip(prompts * 2, answers)], response_mask(tokens, P, pad)
    with autocast(device, dtype):
        pref = judge(texts[:B], texts[B:], tokens[:B], tokens[B:], P)
        ref_logp = token_logprobs(ref, tokens, pad)
        logp = token_logprobs(policy, tokens, pad) if check else ref_logp
    tol = 1e-4 if dtype == "fp32" and torch.device(device).type == "cpu" else 0.1
    for what, x, y, m in (("sampled vs recomputed", gen_logp, logp[:, P - 1:], mask[:, P - 1:]),
                          ("of the policy vs the reference", logp, ref_logp, mask)) if check else ():
        if (diff := torch.where(m.bool(), x - y, 0.0).abs().max().item()) > tol:
            raise RuntimeError(f"sanity check before any update: log-probs {what} differ by {diff:.2e}")
    pairs, n_tie, n_unended = label_pairs(pref, (tokens[:B] == tokens[B:]).all(1), torch.tensor(ended))
    rows = torch.cat([pairs[:, 0], pairs[:, 1]]).to(device)
    T = int(mask[rows].sum(0).nonzero().max()) + 2 if len(rows) else 2  # cut the padding after the last EOS
    return dict(tokens=tokens[rows, :T], mask=mask[rows, :T - 1], ref_logps=(ref_logp * mask).sum(1)[rows],
                n_tie=n_tie, n_unended=n_unended)


def train_online_dpo(policy, ref, enc, prompts, judge, cfg: DPOConfig, device="cpu", dtype="fp32", log=print,
                     eval_fn=None):
    """Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer): cfg.online_steps dpo_steps, each on batch_size
    prompts answered twice by the policy as it is now (data-parallel: each rank its share, its own seed),
    judged (judged_pairs) by judge(texts_a, texts_b, tokens_a, tokens_b, prompt_len) -> (B,) > 0 a wins, < 0
    b, 0 tie (or bools, True: a), e.g. reward_model_judge; texts: prompt + answer; tokens (B, T). `ref`: the
    frozen reference. sample_every k > 1: iterative DPO (Xiong et al. 2024), k steps per round of sampling.
    -> (policy, history: records, eval, seconds, implicit_accuracy (pairs of the last tenth of the steps
    ranked as the judge did, before learning them: fresh, held out), n_pairs (in the loss), n_tie, n_unended,
    n_skipped, skipped_share (of pairs sampled), steps_skipped (no usable pair), judge_calls (answers))."""
    t_start, B, steps, k, r = time.time(), cfg.batch_size, cfg.online_steps, cfg.sample_every, dist.rank()
    gen, sampler = torch.Generator().manual_seed(cfg.seed), torch.Generator(device).manual_seed(cfg.seed + r)
    queue = [prompts[i] for _ in range(-(-steps * B // len(prompts)))
             for i in torch.randperm(len(prompts), generator=gen).tolist()]
    batches, counts = {}, []  # counts: per step (pairs kept, ties, unended) of every rank

    def next_batch(step):
        for s in range(step, min(step + k, steps)) if step % k == 0 else ():  # a round's pairs, from pi now
            batches[s] = judged_pairs(policy, ref, judge, enc, queue[s * B:(s + 1) * B][dist.shard(B)], cfg,
                                      device, dtype, sampler, check=s == 0)  # this rank's prompts
        b = batches.pop(step)
        counts.append(dist.all_sum(torch.tensor([len(b["tokens"]) // 2, b["n_tie"], b["n_unended"]],
                                                device=device)).tolist())
        return b["tokens"], b["mask"], b["ref_logps"]
    figures = lambda step: {"skipped_share": 1 - counts[step][0] / B, "judge_calls": 2 * B * (step + 1)}
    records, last_eval, ranked = dpo_loop(policy.eval(), "dpo_online", steps, next_batch, figures, cfg,
                                          device, dtype, log, eval_fn, tok.pad_id(enc))  # eval: as it sampled
    tail = [(acc.item() * m, m) for acc, m in ranked[-max(1, steps // 10):] if m] or [(0, 0)]  # (right, n)
    (kept, ties, unended), (right, total) = map(sum, zip(*counts)), map(sum, zip(*tail))
    return policy.eval(), dict(records=records, eval=last_eval, seconds=time.time() - t_start, n_pairs=kept,
                               implicit_accuracy=right / total if total else None, judge_calls=2 * B * steps,
                               n_tie=ties, n_unended=unended, n_skipped=ties + unended,
                               skipped_share=(ties + unended) / (B * steps),
                               steps_skipped=sum(c[0] == 0 for c in counts))
