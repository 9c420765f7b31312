"""Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer): DPO on the policy's
own answers, sampled and judged as it trains. Offline pairs (dpo.py) say
less and less about the answers a moving policy gives; here every step
answers fresh prompts twice (rollout.sample, as PPO does), a judge (the
reward model, or the annotators) picks the better of each pair, and one
`dpo.dpo_step` learns from them, against the same frozen reference.
"""
import time

import torch

import dist
import rollout
import tokenizer as tok
from dpo import DPOConfig, due, dpo_step
from model import adamw, autocast
from reward import score
from sft import set_lr


def reward_model_judge(rm, pad_id):
    """The reward model PPO maximises as online DPO's judge: > 0 where
    answer a scores higher than b (one forward: a's rows, then b's)."""
    def judge(texts_a, texts_b, tokens_a, tokens_b, prompt_len):
        score_a, score_b = score(rm, torch.cat([tokens_a, tokens_b]), pad_id).view(2, -1)
        return score_a - score_b
    return judge


def label_pairs(pref, same, ended):
    """Verdicts pref (B,) on pairs (a, b) = rows (i, B + i) of 2B answers;
    same (B,): identical pairs; ended (2B,) -> (pairs (n, 2): rows of each
    kept chosen and rejected, n_tie, n_unended). leash's rule for unended
    answers (TRL's missing_eos_penalty in spirit, as PPO's no_eos_score):
    an ended answer beats an unended one whatever the judge says; a pair
    is skipped when both are unended (n_unended), or on a tie or identical
    answers (n_tie: h = 0 whatever pi, nothing to learn)."""
    pref = torch.as_tensor(pref).cpu()
    pref = pref.float() * 2 - 1 if pref.dtype == torch.bool else pref.float()
    B = len(pref)
    ended_a, ended_b = ended.cpu().view(2, B)
    pref = torch.where(ended_a != ended_b, ended_a.float() * 2 - 1, pref)

    unended = ~ended_a & ~ended_b
    tie = ~unended & ((pref == 0) | same.cpu())
    a = torch.arange(B)
    pairs = torch.stack([a, a + B], 1)  # (a, b), flipped where b wins
    pairs = torch.where(pref[:, None] > 0, pairs, pairs.flip(1))
    return pairs[~(unended | tie)], int(tie.sum()), int(unended.sum())


def judged_pairs(policy, ref, judge, enc, prompts, budget, device="cpu", dtype="fp32",
                 check=False):
    """Two answers to each prompt from `policy` as it is now, judged, the
    usable pairs kept -> dict: tokens (2n, T), the chosen rows then the
    rejected; mask; ref_logps (2n,); n_tie; n_unended."""
    B = len(prompts)
    ro = rollout.sample(policy, ref, enc, prompts * 2, budget, 1.0, device, dtype,
                        check)  # rows i and B + i answer prompt i
    tokens, texts, P = ro["tokens"], ro["texts"], ro["prompt_len"]
    with torch.no_grad(), autocast(device, dtype):
        pref = judge(texts[:B], texts[B:], tokens[:B], tokens[B:], P)

    same = (tokens[:B] == tokens[B:]).all(1)
    pairs, n_tie, n_unended = label_pairs(pref, same, ro["ended"])
    rows = torch.cat([pairs[:, 0], pairs[:, 1]]).to(device)
    mask = ro["mask"]
    # cut the padding after the last EOS
    T = int(mask[rows].sum(0).nonzero().max()) + 2 if len(rows) else 2
    ref_logps = (ro["ref_logp"] * mask).sum(1)
    return dict(tokens=tokens[rows, :T], mask=mask[rows, :T - 1],
                ref_logps=ref_logps[rows], n_tie=n_tie, n_unended=n_unended)


def train_online_dpo(policy, ref, enc, prompts, judge, cfg: DPOConfig, device="cpu",
                     dtype="fp32", log=print, eval_fn=None):
    """cfg.steps dpo_steps, each on batch_size prompts answered twice, judged by
    judge(texts_a, texts_b, tokens_a, tokens_b, P) -> (B,) > 0 a wins, < 0 b, 0 tie
    (or bools). sample_every k > 1: iterative DPO (Xiong et al. 2024). -> (policy,
    history: implicit_accuracy (the last tenth's fresh pairs, ranked before they
    were learned), n_pairs, n_tie, n_unended, skipped_share, judge_calls...)."""
    t0, B, steps = time.time(), cfg.batch_size, cfg.steps
    rollout.seed_ranks(cfg.seed)
    block = policy.cfg.block_size
    budget = cfg.max_new_tokens or rollout.response_budget(enc, prompts, block)
    batches = rollout.prompt_batches(prompts, B, cfg.seed)
    opt = adamw(policy.parameters(), device, cfg.lr)
    policy.eval()
    records, last_eval, counts, ranked = [], {}, [], []

    for step in range(steps):
        if step % cfg.sample_every == 0:  # a round's pairs, from pi as it is now
            n_batches = min(cfg.sample_every, steps - step)
            round_pairs = [judged_pairs(policy, ref, judge, enc, next(batches), budget,
                                        device, dtype, check=step + j == 0)
                           for j in range(n_batches)]
        b = round_pairs[step % cfg.sample_every]
        mine = torch.tensor([len(b["tokens"]) // 2, b["n_tie"], b["n_unended"]])
        counts.append(dist.all_sum(mine.to(device)).tolist())  # the whole batch's
        n = counts[-1][0]

        set_lr(opt, step, steps, cfg)
        figures = {}
        if n:  # no usable pair at all: no step
            figures = dpo_step(policy, opt, b["tokens"], b["mask"], b["ref_logps"], cfg,
                               device, dtype, tok.pad_id(enc))
        ranked.append((figures.get("accuracy"), n))
        if not due(step, steps, cfg):
            continue
        pairs_per_s = sum(c[0] for c in counts) / (time.time() - t0)
        rec = {"stage": "dpo_online", "step": step, **figures,
               "lr": opt.param_groups[0]["lr"], "skipped_share": 1 - n / B,
               "judge_calls": 2 * B * (step + 1), "pairs_per_s": pairs_per_s}
        last_eval = rollout.report(rec, policy, steps, cfg.eval_every, t0, eval_fn,
                                   log) or last_eval
        records.append(rec)

    tail = [(acc * n, n) for acc, n in ranked[-max(1, steps // 10):] if n]
    right, total = map(sum, zip(*tail)) if tail else (0, 0)
    kept, ties, unended = map(sum, zip(*counts))
    return policy.eval(), dict(records=records, eval=last_eval, seconds=time.time() - t0,
                               n_pairs=kept, judge_calls=2 * B * steps,
                               implicit_accuracy=right / total if total else None,
                               n_tie=ties, n_unended=unended, n_skipped=ties + unended,
                               skipped_share=(ties + unended) / (B * steps),
                               steps_skipped=sum(c[0] == 0 for c in counts))
