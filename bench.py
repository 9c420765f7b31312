"""
Speed and memory of leash's hot paths: one table, on whatever device this runs, in fp32 and
under bf16 autocast, each figure the median of several timed repeats after warm-up.

    python bench.py                     # everything, default preset (gpu on CUDA, else cpu)
    python bench.py --quick             # 1 warm-up + 3 repeats, no torch.compile
    python bench.py --json --dtype bf16 --only ppo,dpo --threads 1

bench.py calls leash's public functions as they are and never assigns an attribute of a project
module. A variant it compares is an argument of the function (GPTConfig(fused_attention=...),
model.autocast(..., sampling=...), the optimizer handed to ppo.optimise) or is written here (the
models of section heads: subclasses of model.GPT and model.ScalarModel).

Sections (--only takes their keys):
  matmul     the matmul peak (report.matmul_peak_flops, the MFU denominator) and two model shapes
  pretrain   sft.train_lm's step: sft.masked_nll, backward, clip, model.adamw
  generate   model.GPT.generate (KV cache) against recomputing the prefix at every step, under
             model.autocast(device, dtype, sampling=True) as rollout.sample samples
  sampling   generate() in fp32 against under bf16 autocast, whatever --dtype says: the
             measurement behind model.autocast's rule that sampling on a CPU stays fp32
  ppo        whole updates of ppo.train_ppo in a steady state (timestamps from its log callback),
             and an update split into its public pieces, called here on a second set of models,
             one round of them inside the log callback after each update (outside its timing):
               rollout       train_ppo's step 1: rollout.sample (generation, forwards of policy
                             and reference, decoding the texts), rollout.score (the reward
                             model's forward), the critic's forward (ppo_rollout, here)
               generation    policy.generate alone, as rollout.sample calls it
               rewards       kl.kl_penalized_rewards + ppo.gae + ppo.whiten
               optimisation  ppo.optimise: epochs x minibatches of forward + backward + Adam
               other         the update minus those parts: its statistics (exact KL, entropy,
                             the texts' gold reward), the controller (median of per-round
                             differences)
  grpo       a GRPO update (rollout.sample, rollout.score, grpo.advantages, grpo.optimise,
             dist.mean_stats) against a PPO update (ppo_update: ppo_rollout, rewards, ppo.optimise) at the
             issue's setting, taking turns: GRPO / PPO per round
  dpo        dpo.train_dpo's step, dpo.dpo_step (sequence_logps, dpo_loss + the NLL term,
             dist.step), with the reference precomputed (dpo.pair_logps, as train_dpo) and with
             its forward at every step
  dpo-online whole steps of online_dpo.train_online_dpo in a steady state (timestamps from its log
             callback): 2 answers to each of the preset's DPO batch of prompts, judged by
             online_dpo.reward_model_judge, one DPO step; its policy (EndingGPT, written here)
             raises its EOS logit so that answers end and pairs are kept. Per judge call: the step /
             answers judged; the judge alone: reward_model_judge on full-length answers, after each
             step
  attention  forward + backward of a PPO minibatch with GPTConfig(fused_attention=False / True)
  adam       an optimiser step over policy + critic: model.adamw (fused) against
             torch.optim.AdamW's for-loop and foreach versions, and whole ppo.optimise calls
  ablation   whole ppo.train_ppo updates as shipped and with fused_attention flipped
  heads      the fp32 output heads (model.fp32_linear) against the heads of before (bf16 under
             autocast: AutocastHeadGPT, AutocastHeadScalarModel, written here), same weights,
             taking turns on the preset's PPO setting: generation as rollout.sample does it
             (sampling=True: fp32 on a CPU), generation under autocast (as on a GPU),
             ppo.optimise on one batch, a whole PPO update; fp32 head / autocast head per round
  compile    a minibatch's forward + backward, eager against torch.compile (not with --quick)

FLOPs: report.flops_per_token counts training (forward + backward = 3 forwards) as 6 N + 12 L C T
per token (PaLM, appendix B), N = 12 L C^2 + V C. A forward is a third of that; a ScalarModel
(reward model, critic) has no V x C output matrix: 2 V C less. MFU = counted FLOPs / seconds /
the matmul peak measured in this run on the same device and dtype. On CUDA, TF32 is enabled as
train.py does, so "fp32" means the same here as in a training run.

Models are randomly initialised (speed does not depend on the weights) and can never output EOS
(n_out = EOS id), so every answer runs to its full length in every repeat. Variants that are
compared take turns, one timing each per round, so a shared machine's drift hits all alike;
compare figures within one run.
"""
import argparse
import ctypes
import functools
import gc
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

import cli
import dist
import dpo
import grpo
import kl
import online_dpo
import ppo
import report
import reward
import rollout
import sft
import tokenizer as tok
import world
from model import GPT, GPTConfig, ScalarModel, adamw, autocast
from reference import freeze, token_logprobs, trainable

# The comparison in the performance issue: GPT 4 x 128, vocabulary 512, 64 rollouts of
# 8 prompt + 32 response tokens, 4 PPO epochs, separate critic; DPO 32 pairs of 8 + 32.
ISSUE = dict(name="4x128 V512", n_layer=4, n_head=4, n_embd=128, vocab=512, prompt=8, response=32,
             rollouts=64, pairs=32, minibatch=16)


def preset_setting(name):
    p, stage = cli.PRESETS[name], cli.STAGES[name]
    ppo_cfg, dpo_cfg = ppo.PPOConfig(**stage["ppo"]), dpo.DPOConfig(**stage["dpo"])
    return dict(name=f"preset {name}", n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
                vocab=p["vocab_size"], prompt=8, response=p["block_size"] - 8, rollouts=ppo_cfg.rollouts,
                pairs=dpo_cfg.batch_size, batch=p["batch_size"], block=p["block_size"],
                minibatch=ppo_cfg.minibatch_size)


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, fn's result) of one call, the device synchronised on both sides."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def take_turns(variants, device, warmup, repeats):
    """variants {name: fn}: each round calls every fn once, in turn; returns {name: [seconds of
    each timed round]}. Interleaving makes a drifting machine slow all variants alike."""
    seconds = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, fn in variants.items():
            t, _ = timed(fn, device)
            if round_ >= warmup:
                seconds[name].append(t)
    return seconds


def reset_peak_memory(device):
    """Start a section's peak from what is in use now. On the CPU freed heap is handed back
    to the OS first (glibc's malloc_trim), or the previous section's would count too."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM (peak resident set) to the current RSS
    except (OSError, AttributeError):
        pass  # elsewhere the figure is the process's peak so far


def peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s*(\d+) kB", f.read()).group(1)) / 1024
    except OSError:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
        return kb / 1024


def matmul_flops(device, dtype, m, k, n, warmup, repeats):
    """Median FLOP/s of one (m, k) @ (k, n) product in `dtype` (what autocast turns a Linear into)."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(m, k, device=device, dtype=dt), torch.randn(k, n, device=device, dtype=dt)
    return 2 * m * k * n / median_seconds(lambda: a @ b, device, warmup, repeats)


def forward_flops_per_token(cfg, lm_head=True):
    return report.flops_per_token(cfg) / 3 - (0 if lm_head else 2 * cfg.vocab_size * cfg.n_embd)


# ----------------------------------------------------------------------------- models and data

@functools.cache
def world_texts():
    return world.build_datasets(world.WorldConfig(seed=0, n_pretrain=3000, n_sft=10, n_train_prompts=10,
                                                  n_eval_prompts=8))["pretrain"]


@functools.cache
def encoding(vocab_size):
    """A real BPE tokenizer (EOS and PAD the last two ids, as in train.py); ~0.1 s to train."""
    return tok.train_tokenizer(world_texts(), vocab_size)


def make_gpt(s, block_size, device, fused_attention=None, gpt_class=GPT):
    enc = encoding(s["vocab"])
    cfg = GPTConfig(block_size=block_size, vocab_size=tok.padded_vocab_size(enc), n_layer=s["n_layer"],
                    n_head=s["n_head"], n_embd=s["n_embd"], n_out=tok.eos_id(enc),  # EOS never sampled
                    fused_attention=fused_attention)
    return gpt_class(cfg).to(device), enc


class AutocastHeadGPT(GPT):
    """The GPT with its output projection as it was before model.fp32_linear: a plain F.linear, so
    that under bf16 autocast the logits are a bf16 matmul (token_logprobs casts them to fp32 after).
    The same parameters as GPT: a state_dict loads either way. Section heads compares the two."""

    def lm_head(self, h):
        return F.linear(h, self.wte.weight[:self.head_rows])[..., :self.n_out]


class AutocastHeadScalarModel(ScalarModel):
    """ScalarModel with its scalar head as it was before model.fp32_linear: self.head(h) plain (bf16
    under autocast), then cast to fp32. Build it from an AutocastHeadGPT."""

    def forward(self, tokens, pad_mask=None):
        return self.head(self.gpt.trunk(tokens, pad_mask)).squeeze(-1).float() * self.gain + self.bias


def fixed_length_prompts(enc, n, length):
    """n texts that encode to exactly `length` tokens (prefixes of world reviews)."""
    out = []
    for text in world_texts():
        ids = tok.encode(enc, text)[:length]
        if len(ids) == length and tok.encode(enc, enc.decode(ids)) == ids:
            out.append(enc.decode(ids))
        if len(out) == n:
            return out
    raise RuntimeError(f"found only {len(out)} prompts of {length} tokens")


def prompt_batch(enc, n, length, device):
    ids = [tok.encode(enc, p) for p in fixed_length_prompts(enc, n, length)]
    return tok.left_pad(ids, tok.pad_id(enc)).to(device)


@torch.no_grad()
def generate_without_cache(model, prompt, max_new_tokens):
    """Temperature-1 sampling that runs the whole prefix through the model at every step:
    what generate() would cost without its KV cache. prompt (B, P), no padding."""
    tokens = prompt
    for _ in range(max_new_tokens):
        probs = torch.softmax(model(tokens)[:, -1].float(), dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1)], dim=1)
    return tokens


def ppo_setup(s, device, fused_attention=None, autocast_heads=False, **cfg_changes):
    """What train.py hands ppo.train_ppo, untrained: a trainable policy, its frozen reference, a
    frozen reward model (ScalarModel) read by score_fn, and a trainable critic copied from it.
    autocast_heads: the four models with the output heads of before (AutocastHeadGPT,
    AutocastHeadScalarModel); the same weights as the shipped ones under the same torch seed."""
    T = s["prompt"] + s["response"]
    gpt_class, scalar_class = (AutocastHeadGPT, AutocastHeadScalarModel) if autocast_heads \
        else (GPT, ScalarModel)
    sft_model, enc = make_gpt(s, T, device, fused_attention, gpt_class)
    rm = freeze(scalar_class(sft_model, head_std=0.02).to(device))
    pad = tok.pad_id(enc)
    cfg = ppo.PPOConfig(rollouts=s["rollouts"], max_new_tokens=s["response"], eval_every=10 ** 9,
                        minibatch_size=s["minibatch"], **cfg_changes)
    return dict(policy=trainable(sft_model), ref=freeze(sft_model), rm=rm, critic=trainable(rm), enc=enc,
                cfg=cfg, prompts=fixed_length_prompts(enc, s["rollouts"], s["prompt"]),
                score_fn=lambda tokens, prompt_len: reward.score(rm, tokens, pad))


def ppo_optimizer(m, device, kind="shipped"):
    """train_ppo's optimiser (model.adamw: fused) over policy and critic, or torch's AdamW with
    kind "loop" (fused=False, foreach=False) or "foreach", with the same groups and settings."""
    groups = [{"params": list(m["policy"].parameters()), "lr": m["cfg"].lr},
              {"params": list(m["critic"].parameters()), "lr": m["cfg"].critic_lr}]
    if kind == "shipped":
        return adamw(groups, device, m["cfg"].lr, betas=(0.9, 0.999), eps=1e-5)
    return torch.optim.AdamW(groups, lr=m["cfg"].lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.0,
                             fused=False, foreach=kind == "foreach")


def time_ppo_updates(s, device, dtype, warmup, repeats, fused_attention=None, between=None):
    """Seconds of each steady-state update of one ppo.train_ppo run of warmup + repeats updates,
    from timestamps its log callback takes. Steady state, because a run is many updates: the first
    also builds Adam's state and runs the update-0 checks. between(): called in the callback after
    each update, outside the timed span (so other timings can take turns with the updates)."""
    m = ppo_setup(s, device, fused_attention, updates=warmup + repeats)
    seconds, start = [], [time.perf_counter()]

    def log(rec):
        sync(device)
        seconds.append(time.perf_counter() - start[0])
        if between is not None:
            between()
        sync(device)
        start[0] = time.perf_counter()
    ppo.train_ppo(m["policy"], m["ref"], m["score_fn"], m["critic"], m["enc"], m["prompts"], m["cfg"],
                  device, dtype, log=log)
    return seconds[warmup:]


def ppo_rollout(m, device, dtype):
    """train_ppo's step 1 on m's prompts: rollout.sample (cfg.max_new_tokens: the response budget),
    rollout.score (no_eos_score applied: ro["scored"]), then the critic's value of every state
    (ro["values"]), as train_ppo computes them."""
    cfg, pad = m["cfg"], tok.pad_id(m["enc"])
    ro = rollout.sample(m["policy"], m["ref"], m["enc"], m["prompts"], cfg.max_new_tokens,
                        cfg.temperature, device, dtype)
    ro["scored"] = rollout.score(ro, m["score_fn"], cfg, cfg.max_new_tokens, device, dtype)
    with torch.no_grad(), autocast(device, dtype):
        ro["values"] = m["critic"](ro["tokens"], ro["tokens"] != pad)[:, :-1].float()
    return ro


def ppo_batch(m, ro):
    """train_ppo's step 2 and 3 on a rollout (ppo_rollout): KL-shaped rewards, GAE, whitened
    advantages."""
    cfg, mask = m["cfg"], ro["mask"]
    rewards = kl.kl_penalized_rewards(ro["scored"], ro["logp"], ro["ref_logp"], mask, cfg.beta,
                                      cfg.kl_estimator, ro["logits"], ro["ref_logits"])
    advantages, returns = ppo.gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
    return dict(tokens=ro["tokens"], logp=ro["logp"], values=ro["values"], returns=returns, mask=mask,
                advantages=ppo.whiten(advantages, mask))


def ppo_update(m, optimizer, device, dtype):
    """train_ppo's steps 1-4 without its figures: ppo_rollout, ppo_batch, ppo.optimise."""
    batch = ppo_batch(m, ppo_rollout(m, device, dtype))
    ppo.optimise(m["policy"], m["critic"], batch, optimizer, m["cfg"], tok.pad_id(m["enc"]), device, dtype)


def minibatch_step(device, dtype, left_padded=True, fused_attention=None, compile=False):
    """Forward + backward of reference.token_logprobs on a PPO minibatch (16 x 40) of the 4 x 128
    model. left_padded: what ppo.optimise does (pad_id given, so attention gets an explicit mask;
    half the rows start with 3 PAD); else pad_id None, plain causal attention (SFT, DPO)."""
    model, enc = make_gpt(ISSUE, ISSUE["prompt"] + ISSUE["response"], device, fused_attention)
    tokens = torch.randint(model.n_out, (16, model.cfg.block_size), device=device)
    if left_padded:
        tokens[::2, :3] = tok.pad_id(enc)
    fast = torch.compile(model) if compile else model

    def step():
        with autocast(device, dtype):
            logp = token_logprobs(fast, tokens, tok.pad_id(enc) if left_padded else None)
        model.zero_grad(set_to_none=True)
        logp.sum().backward()
    return step


# ----------------------------------------------------------------------------- the benchmarks
# A per-dtype section takes (device, dtype, run) and yields (measurement, unit, value) rows; a
# section that compares dtypes itself takes (device, run) and yields (measurement, unit,
# {"fp32": value, "bf16": value, "ratio": bf16/fp32 measured round by round}) rows.

def bench_matmul(device, dtype, run):
    peak, median = run["peak"][dtype], matmul_flops(device, dtype, 1024, 1024, 1024, *run["reps"])
    yield "matmul peak: report.matmul_peak_flops, best of 30 (MFU's denominator)", "GFLOP/s", peak / 1e9
    yield "matmul 1024^3, median", "GFLOP/s", median / 1e9
    # shapes of the 4 x 128 model: qkv on a PPO minibatch (16 x 40), MLP on 64 rollouts
    for (m, k, n), what in (((640, 128, 384), "qkv, PPO minibatch"), ((2560, 128, 512), "MLP, 64 rollouts")):
        rate = matmul_flops(device, dtype, m, k, n, *run["reps"])
        yield f"matmul {m}x{k}x{n} ({what}), median", "GFLOP/s", rate / 1e9


def bench_pretrain(device, dtype, run):
    s = run["preset"]
    model, _ = make_gpt(s, s["block"], device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # sft.train_lm's groups
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = adamw([{"params": decay, "weight_decay": 0.1}, {"params": no_decay}], device, 1e-4)
    tokens = torch.randint(model.n_out, (s["batch"], s["block"]), device=device)
    mask = torch.ones(s["batch"], s["block"] - 1, device=device)

    def step():  # sft.train_lm's step
        with autocast(device, dtype):
            loss = sft.masked_nll(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    tok_s = tokens.numel() / median_seconds(step, device, *run["reps"])
    yield f"pretrain {s['name']}, {s['batch']}x{s['block']} tokens", "tokens/s", tok_s
    mfu = 100 * tok_s * report.flops_per_token(model.cfg) / run["peak"][dtype]
    yield "  MFU (6N + 12LCT per token)", "%", mfu


def bench_generate(device, dtype, run):
    s, new = run["preset"], 64
    model, enc = make_gpt(s, s["prompt"] + new, device)
    model.eval()
    prompt = prompt_batch(enc, s["rollouts"], s["prompt"], device)
    with autocast(device, dtype, sampling=True):  # as ppo.rollout samples
        cached = median_seconds(lambda: model.generate(prompt, new, tok.eos_id(enc), tok.pad_id(enc)),
                                device, *run["reps"])
        # no separate warm-up: a run is 64 forwards, and the median drops the first run's
        # one-time costs (every step is a new sequence length)
        recomputed = median_seconds(lambda: generate_without_cache(model, prompt, new), device, 0,
                                    run["reps"][1])
    n = s["rollouts"] * new
    yield f"generate, KV cache, {s['rollouts']} x ({s['prompt']} + {new}), autocast(sampling=True)", \
        "new tokens/s", n / cached
    yield "generate, no cache (whole prefix every step)", "new tokens/s", n / recomputed
    yield "  KV cache speed-up", "x", recomputed / cached


def sampler(s, new, device, dtype):
    """A function that samples s["rollouts"] answers of `new` tokens with the KV cache, in fp32
    (dtype "fp32") or under bf16 autocast (model.autocast(device, "bf16"): sampling=False)."""
    model, enc = make_gpt(s, s["prompt"] + new, device)
    model.eval()
    prompt = prompt_batch(enc, s["rollouts"], s["prompt"], device)

    def sample():
        with autocast(device, dtype):
            model.generate(prompt, new, tok.eos_id(enc), tok.pad_id(enc))
    return sample


def bench_sampling(device, run):
    """generate() in fp32 and under bf16 autocast, taking turns, 3x the usual repeats: what
    model.autocast's rule (sampling on a CPU stays fp32) rests on; on a GPU it samples in bf16."""
    rule = "fp32" if isinstance(autocast(device, "bf16", sampling=True), nullcontext) else "bf16"
    for setting, new in ((run["preset"], 64), (ISSUE, ISSUE["response"])):
        variants = {d: sampler(setting, new, device, d) for d in ("fp32", "bf16")}
        sec = take_turns(variants, device, run["reps"][0], 3 * run["reps"][1])
        n = setting["rollouts"] * new
        yield (f"generate {setting['name']}, {setting['rollouts']} x ({setting['prompt']} + {new}): "
               f"fp32 | bf16 autocast (rule on {device}: {rule})", "new tokens/s",
               {d: n / statistics.median(sec[d]) for d in sec} |
               {"ratio": statistics.median(f / b for f, b in zip(sec["fp32"], sec["bf16"]))})


def ppo_rows(s):
    def bench(device, dtype, run):
        # The parts: the public pieces of an update, called here on a second setup, one round of
        # them after each update of the train_ppo run (each round: a rollout, its rewards, its
        # optimisation, and a generation alone), so that both see the same state of the machine.
        m = ppo_setup(s, device)
        policy, critic, cfg, enc = m["policy"], m["critic"], m["cfg"], m["enc"]
        policy.eval(), critic.eval()  # as train_ppo: dropout off
        optimizer, pad = ppo_optimizer(m, device), tok.pad_id(enc)
        prompt = prompt_batch(enc, s["rollouts"], s["prompt"], device)
        rounds = {"rollout": [], "generation": [], "rewards": [], "optimisation": []}

        def generate():  # as rollout.sample calls it
            with torch.no_grad(), autocast(device, dtype, sampling=True):
                policy.generate(prompt, s["response"], tok.eos_id(enc), pad, cfg.temperature)

        def parts():
            t, ro = timed(functools.partial(ppo_rollout, m, device, dtype), device)
            rounds["rollout"].append(t)
            t, batch = timed(functools.partial(ppo_batch, m, ro), device)
            rounds["rewards"].append(t)
            t, _ = timed(functools.partial(ppo.optimise, policy, critic, batch, optimizer, cfg, pad, device,
                                           dtype), device)
            rounds["optimisation"].append(t)
            rounds["generation"].append(timed(generate, device)[0])
        warmup, repeats = run["reps"]
        updates = time_ppo_updates(s, device, dtype, warmup, repeats, between=parts)
        rounds = {k: v[warmup:] for k, v in rounds.items()}
        update, sec = statistics.median(updates), {k: statistics.median(v) for k, v in rounds.items()}
        r = rounds  # differences taken round by round, then their median: drift cancels
        scoring = statistics.median(ro - g for ro, g in zip(r["rollout"], r["generation"]))
        other = statistics.median(u - ro - rw - o for u, ro, rw, o in zip(updates, r["rollout"], r["rewards"],
                                                                              r["optimisation"]))
        T, pcfg = s["prompt"] + s["response"], policy.cfg
        lm, sc = forward_flops_per_token(pcfg), forward_flops_per_token(pcfg, lm_head=False)
        n = s["rollouts"] * T  # each token once through: generation, 4 scoring forwards, epochs x fwd+bwd
        flops = n * lm + n * (2 * lm + 2 * sc) + cfg.epochs * n * 3 * (lm + sc)
        yield (f"PPO {s['name']}, {s['rollouts']} x ({s['prompt']}+{s['response']}), {cfg.epochs} epochs "
               f"x {s['rollouts'] // s['minibatch']} minibatches", "rollouts/s", s["rollouts"] / update)
        yield "  s per update (ppo.train_ppo)", "s", update
        yield "  rollout (rollout.sample, rollout.score, critic values)", "s", sec["rollout"]
        yield "    of which generation (policy.generate alone)", "s", sec["generation"]
        yield "    of which scoring (4 forwards, decoding)", "s", scoring
        yield "  rewards + GAE + whiten", "s", sec["rewards"]
        yield "  ppo.optimise", "s", sec["optimisation"]
        yield "  other (update - the parts: stats, gold reward)", "s", other
        yield "  generation share of the update", "%", 100 * sec["generation"] / update
        yield "  update MFU (forward = 2N + 4LCT per token)", "%", 100 * flops / update / run["peak"][dtype]
        for name in ("policy", "ref", "critic", "rm"):
            yield f"  parameters: {name}", "M", sum(p.numel() for p in m[name].parameters()) / 1e6
    return bench


def grpo_rows(s):
    """GRPO's update against PPO's, taking turns round by round: the same model, rollouts (8 prompts x 8
    answers for GRPO), epochs and minibatches; GRPO has no critic to run in the rollout or to train."""
    def bench(device, dtype, run):
        m = ppo_setup(s, device)
        enc, pad, pcfg = m["enc"], tok.pad_id(m["enc"]), m["cfg"]
        gcfg = grpo.GRPOConfig(rollouts=s["rollouts"], max_new_tokens=s["response"], epochs=pcfg.epochs,
                               minibatch_size=s["minibatch"])
        policy, prompts = trainable(m["ref"]), m["prompts"][:s["rollouts"] // gcfg.group_size]
        group_prompts = [p for p in prompts for _ in range(gcfg.group_size)]
        ppo_opt, grpo_opt = ppo_optimizer(m, device), adamw(policy.parameters(), device, gcfg.lr,
                                                             betas=(0.9, 0.999), eps=1e-5)

        def grpo_update(cfg):  # train_grpo's update, the same way (its stats made global)
            budget, G = cfg.max_new_tokens, cfg.group_size

            def draw(k):  # k groups (dynamic sampling draws more when groups tie)
                ro = rollout.sample(policy, m["ref"], enc, group_prompts[:k * G], budget,
                                    cfg.temperature, device, dtype)
                return ro, rollout.score(ro, m["score_fn"], cfg, budget, device, dtype)
            ro, scores = draw(len(group_prompts) // G)
            if cfg.dynamic_sampling:
                ro, scores, _ = grpo.dynamic_sample(ro, scores, draw, G, cfg.max_resampled, pad)
            mask = ro["mask"] * ro["ended"][:, None] if cfg.mask_unended else ro["mask"]
            adv = grpo.advantages(scores, ro["logp"], ro["ref_logp"], ro["mask"], cfg.beta, cfg)
            batch = dict(tokens=ro["tokens"], logp=ro["logp"], ref_logp=ro["ref_logp"], mask=mask,
                         advantages=adv)
            dist.mean_stats(*grpo.optimise(policy, batch, grpo_opt, cfg, cfg.beta, budget, pad, device,
                                           dtype))
        variants = {v: replace(gcfg, **grpo.VARIANTS[v]) for v in ("grpo", "dapo", "gspo")}
        # the untrained policy's answers never end, so every group ties (all no_eos_score) and
        # DAPO draws fresh groups up to its cap: dynamic sampling's worst case, and without it
        variants["dapo, no dynamic sampling"] = replace(variants["dapo"], dynamic_sampling=False)
        turns = {v: functools.partial(grpo_update, c) for v, c in variants.items()}
        rounds = take_turns({"ppo": functools.partial(ppo_update, m, ppo_opt, device, dtype), **turns},
                            device, *run["reps"])
        ratio = statistics.median(g / p for g, p in zip(rounds["grpo"], rounds["ppo"]))
        yield (f"GRPO against PPO {s['name']}, {s['rollouts']} x ({s['prompt']}+{s['response']}), "
               f"{gcfg.epochs} epochs x {s['rollouts'] // s['minibatch']} minibatches"), "s per update", \
            statistics.median(rounds["grpo"])
        yield "  PPO, the same rounds", "s per update", statistics.median(rounds["ppo"])
        yield "  GRPO / PPO, median of per-round ratios", "ratio", ratio
        for v in ("dapo", "dapo, no dynamic sampling", "gspo"):
            yield f"  {v} (grpo.VARIANTS), the same rounds", "s per update", statistics.median(rounds[v])
            yield f"  {v} / PPO, median of per-round ratios", "ratio", \
                statistics.median(g / p for g, p in zip(rounds[v], rounds["ppo"]))
    return bench


def dpo_rows(s):
    def bench(device, dtype, run):
        T = s["prompt"] + s["response"]
        policy, _ = make_gpt(s, T, device)
        ref = freeze(policy)
        policy.train()
        cfg = dpo.DPOConfig()
        opt = adamw(policy.parameters(), device, cfg.lr)
        tokens = torch.randint(policy.n_out, (s["pairs"], 2, T), device=device)
        mask = torch.zeros(s["pairs"], 2, T - 1, device=device)
        mask[..., s["prompt"] - 1:] = 1.0  # the targets that are response tokens
        t, m = dpo.flatten_pairs(tokens, mask)  # chosen and rejected rows in one batch
        pre = dpo.pair_logps(ref, tokens, mask, device, dtype)  # (B, 2), as train_dpo: once
        precomputed = torch.cat([pre[:, 0], pre[:, 1]]).to(device)  # (2B,) as its step takes them

        def step(ref_every_step):  # train_dpo's step: dpo.dpo_step
            def fn():
                ref_logps = precomputed
                if ref_every_step:
                    with torch.inference_mode(), autocast(device, dtype):
                        ref_logps = dpo.sequence_logps(ref, t, m)
                dpo.dpo_step(policy, opt, t, m, ref_logps, cfg, device, dtype)
            return fn
        sec = {k: statistics.median(v) for k, v in take_turns(
            {"pre": step(False), "every": step(True)}, device, *run["reps"]).items()}
        fwd = t.numel() * forward_flops_per_token(policy.cfg)
        yield (f"DPO {s['name']}, {s['pairs']} pairs of {s['prompt']}+{s['response']}, reference precomputed",
               "pairs/s", s["pairs"] / sec["pre"])
        yield "  DPO MFU (policy fwd + bwd)", "%", 100 * 3 * fwd / sec["pre"] / run["peak"][dtype]
        yield "  the same, reference forward every step", "pairs/s", s["pairs"] / sec["every"]
        yield "  DPO MFU (reference fwd + policy fwd + bwd)", "%", \
            100 * 4 * fwd / sec["every"] / run["peak"][dtype]
    return bench


class EndingGPT(GPT):
    """A GPT whose EOS logit is raised so that, with random weights, it stops with probability 1/16 at
    each token: answers of ~16 tokens, nearly all ended within the preset's budget (online DPO skips a
    pair with an unended answer; bench's other models never end one)."""

    def __init__(self, cfg, eos_id):
        super().__init__(cfg)
        bias = torch.zeros(self.n_out)
        bias[eos_id] = torch.tensor((self.n_out - 1) / 15).log()
        self.register_buffer("eos_bias", bias)

    def lm_head(self, h):
        return super().lm_head(h) + self.eos_bias


def online_dpo_rows(s):
    def bench(device, dtype, run):
        warmup, repeats = run["reps"]
        enc, B, T = encoding(s["vocab"]), s["pairs"], s["prompt"] + s["response"]
        cfg = GPTConfig(block_size=T, vocab_size=tok.padded_vocab_size(enc), n_layer=s["n_layer"],
                        n_head=s["n_head"], n_embd=s["n_embd"], n_out=tok.pad_id(enc))  # EOS can be sampled
        model, pad = EndingGPT(cfg, tok.eos_id(enc)).to(device), tok.pad_id(enc)
        judge = online_dpo.reward_model_judge(freeze(ScalarModel(model, head_std=0.02).to(device)), pad)
        dcfg = dpo.DPOConfig(steps=warmup + repeats, batch_size=B, max_new_tokens=s["response"],
                             log_every=1, eval_every=10 ** 9)
        full = torch.randint(model.n_out - 1, (2 * B, T), device=device)  # full-length answers, no EOS
        seconds, kept, judging, start = [], [], [], [time.perf_counter()]

        def log(rec):  # a step's end: its duration, then the judge alone, outside it
            sync(device)
            seconds.append(time.perf_counter() - start[0])
            kept.append(1 - rec["skipped_share"])
            with torch.no_grad(), autocast(device, dtype):
                judging.append(timed(lambda: judge([""] * B, [""] * B, full[:B], full[B:], s["prompt"]),
                                     device)[0])
            start[0] = time.perf_counter()
        online_dpo.train_online_dpo(trainable(model), freeze(model), enc,
                                    fixed_length_prompts(enc, B, s["prompt"]), judge, dcfg, device, dtype,
                                    log=log)
        step = statistics.median(seconds[warmup:])
        yield (f"online DPO {s['name']}, {B} prompts x 2 answers of {s['prompt']}+<={s['response']}, "
               "reward-model judge", "judge calls/s", 2 * B / step)
        yield "  s per step (online_dpo.train_online_dpo)", "s", step
        yield "  ms per judge call (step / answers judged)", "ms", 1000 * step / (2 * B)
        yield "  ms per judge call, the judge alone", "ms", 1000 * statistics.median(judging[warmup:]) / 2 / B
        yield "  pairs kept (both ended, no tie)", "%", 100 * statistics.median(kept[warmup:])
    return bench


def bench_attention(device, dtype, run):
    """GPTConfig(fused_attention=False / True) on a PPO minibatch, forward + backward, in turns."""
    for left_padded, kind in ((False, "causal"), (True, "pad mask")):
        steps = {fused: minibatch_step(device, dtype, left_padded, fused) for fused in (False, True)}
        sec = take_turns(steps, device, *run["reps"])
        for fused, what in ((False, "written out"), (True, "fused SDPA")):
            yield (f"fwd+bwd 4x128, 16x40 ({kind}), fused_attention={fused} ({what})", "ms",
                   1000 * statistics.median(sec[fused]))


def bench_adam(device, dtype, run):
    """An optimiser step over policy + critic (gradients in place), then whole ppo.optimise calls
    on one rollout batch, with model.adamw and with torch.optim.AdamW's for-loop, in turns."""
    m = ppo_setup(ISSUE, device)
    params = list(m["policy"].parameters()) + list(m["critic"].parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"shipped": "model.adamw (fused)", "loop": "AdamW(fused=False, foreach=False)",
             "foreach": "AdamW(foreach=True)"}
    opts = {k: ppo_optimizer(m, device, k) for k in kinds}
    sec = take_turns({k: opt.step for k, opt in opts.items()}, device, run["reps"][0], 5 * run["reps"][1])
    n = sum(p.numel() for p in params) / 1e6
    for k, what in kinds.items():
        yield f"optimiser step, policy + critic ({n:.2f}M), {what}", "ms", 1000 * statistics.median(sec[k])
    # ppo.optimise takes the optimiser as an argument: one rollout, each variant its own models
    variants = {}
    for k in ("shipped", "loop"):
        mk = ppo_setup(ISSUE, device)
        mk["policy"].eval(), mk["critic"].eval()
        ro = ppo_rollout(mk, device, dtype)
        variants[k] = functools.partial(ppo.optimise, mk["policy"], mk["critic"], ppo_batch(mk, ro),
                                        ppo_optimizer(mk, device, k), mk["cfg"], tok.pad_id(mk["enc"]),
                                        device, dtype)
    sec = take_turns(variants, device, *run["reps"])
    for k in variants:
        yield f"ppo.optimise 4x128, 64 rollouts, 4 x 4 minibatches, {kinds[k]}", "s", \
            statistics.median(sec[k])


def bench_ablation(device, dtype, run):
    """Whole ppo.train_ppo updates at the issue's settings, as shipped and with the attention route
    flipped (GPTConfig.fused_attention). The variants take turns, one run of a warm-up update and
    a timed one each per round. (Adam's variant is in section adam: train_ppo builds its own.)"""
    default_fused = torch.device(device).type != "cpu"  # fused_attention=None picks this
    variants = {"PPO update 4x128 (issue settings), as shipped": None,
                f"  fused_attention={not default_fused} instead": not default_fused}
    seconds = {name: [] for name in variants}
    for round_ in range(sum(run["reps"])):
        for name, fused in variants.items():
            t = time_ppo_updates(ISSUE, device, dtype, 1, 1, fused)[0]
            if round_ >= run["reps"][0]:
                seconds[name].append(t)
    for name in variants:
        yield name, "s", statistics.median(seconds[name])


def bench_heads(device, dtype, run):
    """The cost of the fp32 output heads (model.fp32_linear in GPT.lm_head and ScalarModel.forward)
    against the heads of before (AutocastHeadGPT, AutocastHeadScalarModel: under bf16 autocast a
    bf16 matmul), on the preset's PPO setting: two setups with the same weights, taking turns part
    by part in every round, 3x the usual repeats. The ratio is fp32 head / autocast head, the median
    of per-round ratios. Under --dtype fp32 both heads are fp32 matmuls: a control for the noise."""
    s = run["preset"]
    parts = {"generation": "generation (policy.generate as rollout.sample: autocast(sampling=True))",
             "generation (autocast)": "generation under autocast(device, dtype), as on a GPU",
             "optimisation": "ppo.optimise on one rollout batch",
             "update": "whole PPO update (ppo_update: ppo_rollout, rewards + GAE, ppo.optimise)"}
    heads = {"fp32": False, "autocast": True}
    calls = {}
    encoding(s["vocab"])  # trained (and cached) before the seeds, in case it draws from torch's RNG
    for head, old in heads.items():
        torch.manual_seed(0)  # the same weights for both
        m = ppo_setup(s, device, autocast_heads=old)
        policy, cfg, enc = m["policy"], m["cfg"], m["enc"]
        policy.eval(), m["critic"].eval()  # as train_ppo
        optimizer, pad, eos = ppo_optimizer(m, device), tok.pad_id(enc), tok.eos_id(enc)
        prompt = prompt_batch(enc, s["rollouts"], s["prompt"], device)
        batch = ppo_batch(m, ppo_rollout(m, device, dtype))

        def generate(sampling, policy=policy, prompt=prompt, pad=pad, eos=eos, cfg=cfg):
            with torch.no_grad(), autocast(device, dtype, sampling=sampling):
                policy.generate(prompt, s["response"], eos, pad, cfg.temperature)
        calls[head] = {"generation": functools.partial(generate, True),
                       "generation (autocast)": functools.partial(generate, False),
                       "optimisation": functools.partial(ppo.optimise, policy, m["critic"], batch, optimizer,
                                                         cfg, pad, device, dtype),
                       "update": functools.partial(ppo_update, m, optimizer, device, dtype)}
    sec = take_turns({(part, head): calls[head][part] for part in parts for head in heads}, device,
                     run["reps"][0], 3 * run["reps"][1])
    setting = (f"{s['name']}, {s['rollouts']} x ({s['prompt']}+{s['response']}), {cfg.epochs} epochs x "
               f"{s['rollouts'] // s['minibatch']} minibatches: ")
    for i, (part, what) in enumerate(parts.items()):
        fp32, old = sec[(part, "fp32")], sec[(part, "autocast")]
        yield f"{setting if i == 0 else ''}{what}, fp32 head (shipped)", "s", statistics.median(fp32)
        yield f"  {part}, autocast head (before)", "s", statistics.median(old)
        yield f"  {part}, fp32 head / autocast head (median of per-round ratios)", "x", \
            statistics.median(f / o for f, o in zip(fp32, old))


def bench_compile(device, dtype, run):
    eager = median_seconds(minibatch_step(device, dtype), device, *run["reps"])
    yield "fwd+bwd 4x128, 16x40 (pad mask), eager", "ms", 1000 * eager
    try:
        step = minibatch_step(device, dtype, compile=True)
        first = median_seconds(step, device, 0, 1)  # the first call compiles
        ms = 1000 * median_seconds(step, device, *run["reps"])
    except Exception as e:  # no C++ compiler, an unsupported device, ...
        print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        first = ms = None
    yield "fwd+bwd 4x128, 16x40 (pad mask), torch.compile", "ms", ms
    yield "  torch.compile: first call (compiling)", "s", first


# ----------------------------------------------------------------------------- the table

def print_table(rows, header):
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    dtypes = [d for d in ("fp32", "bf16") if any(d in r for r in rows)]
    both = len(dtypes) == 2
    lines = [["section", "measurement", "unit", *dtypes] + (["bf16/fp32"] if both else [])]
    for r in rows:
        a, b = r.get("fp32"), r.get("bf16")
        ratio = r.get("ratio") or (b / a if both and a and b is not None and r["unit"] not in ("M", "%", "x")
                                   else None)
        lines.append([r["section"], r["name"], r["unit"], *(fmt(r[d]) if d in r else "-" for d in dtypes)]
                     + ([f"{ratio:.2f}" if ratio else ""] if both else []))
    widths = [max(len(x) for x in col) for col in zip(*lines)]
    print(header)
    for i, line in enumerate(lines):
        print("  ".join(x.ljust(w) if j < 3 else x.rjust(w) for j, (x, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("-" * (sum(widths) + 2 * len(widths) - 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description="leash speed and memory benchmarks (one table)")
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up + 3 repeats (else 2 + 7), no torch.compile")
    ap.add_argument("--json", action="store_true", help="print {meta, rows} as JSON instead of the table")
    ap.add_argument("--preset", default="auto", help="tiny | cpu | gpu | auto (gpu on cuda, else cpu)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"],
                    help="bf16 means bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--only", default=None, help="comma list of: matmul,pretrain,generate,sampling,ppo,grpo,"
                                                 "dpo,dpo-online,attention,adam,ablation,heads,compile")
    args = ap.parse_args(argv)
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = next(d for d in has if has[d]) if args.device == "auto" else args.device  # as train.py
    if not has[device]:
        ap.error(f"--device {device}: no {device.upper()} device is available")
    preset = args.preset if args.preset != "auto" else ("gpu" if device == "cuda" else "cpu")
    if preset not in cli.PRESETS:
        ap.error(f"--preset {args.preset}: unknown (choose {', '.join(cli.PRESETS)} or auto)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":  # as train.py: fp32 matmuls in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    reps = (1, 3) if args.quick else (2, 7)
    p = preset_setting(preset)
    # (key for --only, section, bench, per dtype)
    sections = [("matmul", "matmul", bench_matmul, True), ("pretrain", "pretrain", bench_pretrain, True),
                ("generate", "generate", bench_generate, True),
                ("sampling", "sampling", bench_sampling, False),
                ("ppo", "ppo issue", ppo_rows(ISSUE), True),
                ("ppo", "ppo issue mb64", ppo_rows(dict(ISSUE, minibatch=64)), True),
                ("ppo", "ppo preset", ppo_rows(p), True), ("grpo", "grpo issue", grpo_rows(ISSUE), True),
                ("dpo", "dpo issue", dpo_rows(ISSUE), True),
                ("dpo", "dpo preset", dpo_rows(p), True),
                ("dpo-online", "dpo-online preset", online_dpo_rows(p), True),
                ("attention", "attention", bench_attention, True),
                ("adam", "adam", bench_adam, True), ("ablation", "ablation", bench_ablation, True),
                ("heads", "heads preset", bench_heads, True), ("compile", "compile", bench_compile, True)]
    known = {key for key, *_ in sections}
    wanted = set(args.only.split(",")) if args.only else known - ({"compile"} if args.quick else set())
    if wanted - known:
        ap.error(f"--only {args.only}: unknown section(s) {', '.join(sorted(wanted - known))}")
    torch.manual_seed(0)
    t_start, load_start = time.time(), os.getloadavg()[0]
    run = {"reps": reps, "preset": p,
           "peak": {d: report.matmul_peak_flops(device, d, repeats=30) for d in dtypes}}
    rows = {}
    for key, section, bench, per_dtype in sections:
        if key not in wanted:
            continue
        for dtype in dtypes if per_dtype else [None]:
            t0 = time.time()
            reset_peak_memory(device)
            for name, unit, value in bench(device, dtype, run) if per_dtype else bench(device, run):
                row = rows.setdefault((section, name), {"section": section, "name": name, "unit": unit})
                row.update(value if isinstance(value, dict) else {dtype: value})
            if per_dtype:
                rows.setdefault((section, "peak memory"), {"section": section, "name": "  peak memory",
                                                           "unit": "MB"})[dtype] = peak_memory_mb(device)
            print(f"bench: {section}, {dtype or 'fp32 and bf16'}: {time.time() - t0:.1f} s", file=sys.stderr,
                  flush=True)
    meta = {"device": device, "preset": preset, "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "warmup": reps[0], "repeats": reps[1],
            "seconds": time.time() - t_start, "load_average": [load_start, os.getloadavg()[0]],
            "memory": "CUDA max allocated" if device == "cuda" else "process peak RSS, per section"}
    if args.json:
        print(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1))
        return
    print_table(list(rows.values()),
                f"leash bench: {device} ({meta['cpu_capability']}), {meta['threads']} threads, torch "
                f"{meta['torch']}, preset {preset}; median of {reps[1]} after {reps[0]} warm-up; "
                f"bf16 = autocast; "
                f"memory = {meta['memory']}; load average {load_start:.1f} -> {meta['load_average'][1]:.1f}; "
                f"{meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
