"""
Speed and memory of leash's hot paths: one table, on whatever device this runs, in fp32
and under bf16 autocast, each figure the median of several timed repeats after warm-up.

    python bench.py                     # everything, default preset (gpu on CUDA, else cpu)
    python bench.py --quick             # 3 repeats, no torch.compile: under two minutes
    python bench.py --json --dtype bf16 --only ppo,dpo --threads 1

What is timed is leash's own code: sft's loss, model.generate, and ppo.train_ppo itself,
whole updates in a steady state (the first ones are warm-up), each split into parts by
stopwatches put around three functions it calls:
    generation    policy.generate (KV cache)
    scoring       the rest of ppo.rollout: forwards of policy, reference, critic and
                  reward model, plus decoding the texts and the sanity checks
    optimisation  ppo.optimise: ppo_epochs x minibatches of forward + backward + Adam
    other         rewards, GAE, whitening, rollout statistics (gold reward of the texts)
The DPO step is written out here (as in dpo.train_dpo), because train_dpo computes the
reference's log-probs once up front and the comparison asks for them at every step.

FLOPs. sft.model_flops_per_token counts training (forward + backward = 3 forwards) as
6 N + 12 L C T per token (PaLM, appendix B), N = 12 L C^2 + V C. A forward is a third of
that; a ScalarModel (reward model, critic) has no V x C output matrix: 2 V C less.
MFU = counted FLOPs / seconds / the 1024^3 matmul rate measured in this run on the same
device and dtype: the share of what this machine can do, right now, that is used.

Models are randomly initialised (speed does not depend on the weights) and can never
output EOS (n_out = EOS id), so every answer runs to its full length in every repeat.
"""
import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import os
import re
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import dpo
import ppo
import reward
import sft
import tokenizer as tok
import train
import world
import model as model_py  # patched by the attention and ablation sections
from model import GPT, GPTConfig
from reference import freeze

# The comparison in the performance issue: GPT 4 x 128, vocabulary 512, 64 rollouts of
# 8 prompt + 32 response tokens, 4 PPO epochs, separate critic; DPO 32 pairs of 8 + 32.
ISSUE = dict(name="4x128 V512", n_layer=4, n_head=4, n_embd=128, vocab=512, prompt=8, response=32,
             rollouts=64, pairs=32, minibatch=16)


def preset_setting(name):
    p, stage = train.PRESETS[name], train.STAGE_OVERRIDES[name]
    ppo_cfg, dpo_cfg = ppo.PPOConfig(**stage["ppo"]), dpo.DPOConfig(**stage["dpo"])
    return dict(name=f"preset {name}", n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
                vocab=p["vocab_size"], prompt=8, response=p["block_size"] - 8, rollouts=ppo_cfg.rollouts,
                pairs=dpo_cfg.batch_size, batch=p["batch_size"], block=p["block_size"], minibatch=ppo_cfg.minibatch_size)


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (20 if sys.platform == "darwin" else 10)


def matmul_flops(device, dtype, m, k, n, warmup, repeats):
    """FLOP/s of one (m, k) @ (k, n) product in `dtype` (what autocast turns a Linear into)."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(m, k, device=device, dtype=dt), torch.randn(k, n, device=device, dtype=dt)
    return 2 * m * k * n / median_seconds(lambda: a @ b, device, warmup, repeats)


def forward_flops_per_token(cfg, lm_head=True):
    return sft.model_flops_per_token(cfg) / 3 - (0 if lm_head else 2 * cfg.vocab_size * cfg.n_embd)


@contextmanager
def stopwatch(owner, name, seconds, device):
    """Replace owner.<name> by a wrapper that adds each call's wall time to seconds[name]."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        sync(device)
        t = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
        return out
    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


# ----------------------------------------------------------------------------- models and data

@functools.cache
def world_texts():
    return world.build_datasets(world.WorldConfig(seed=0, n_pretrain=3000, n_sft=10, n_train_prompts=10,
                                                  n_eval_prompts=8))["pretrain"]


@functools.cache
def encoding(vocab_size):
    """A real BPE tokenizer (EOS and PAD the last two ids, as in train.py); ~0.1 s to train."""
    return tok.train_tokenizer(world_texts(), vocab_size)


def make_gpt(s, block_size, device):
    enc = encoding(s["vocab"])
    cfg = GPTConfig(block_size=block_size, vocab_size=tok.padded_vocab_size(enc), n_layer=s["n_layer"],
                    n_head=s["n_head"], n_embd=s["n_embd"], n_out=tok.eos_id(enc))  # EOS never sampled
    return GPT(cfg).to(device), enc


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


@torch.no_grad()
def generate_without_cache(model, prompt, max_new_tokens):
    """Temperature-1 sampling that runs the whole prefix through the model at every step:
    what generate() would cost without its KV cache. prompt (B, P), no padding."""
    tokens = prompt
    for _ in range(max_new_tokens):
        probs = torch.softmax(model(tokens)[:, -1].float(), dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1)], dim=1)
    return tokens


# ----------------------------------------------------------------------------- the benchmarks
# Each takes (device, dtype, run) and yields (measurement, unit, value) rows.

def bench_matmul(device, dtype, run):
    yield "matmul 1024x1024x1024 (MFU denominator)", "GFLOP/s", run["peak"][dtype] / 1e9
    # shapes of the 4 x 128 model: qkv on a PPO minibatch (16 x 40), MLP on 64 rollouts
    for (m, k, n), what in (((640, 128, 384), "qkv, PPO minibatch"), ((2560, 128, 512), "MLP, 64 rollouts")):
        yield f"matmul {m}x{k}x{n} ({what})", "GFLOP/s", matmul_flops(device, dtype, m, k, n, *run["reps"]) / 1e9


def bench_pretrain(device, dtype, run):
    s = run["preset"]
    model, _ = make_gpt(s, s["block"], device)
    opt = sft.adamw(model.parameters(), device, 1e-4, weight_decay=0.1)
    tokens = torch.randint(model.n_out, (s["batch"], s["block"]), device=device)
    mask = torch.ones(s["batch"], s["block"] - 1, device=device)

    def step():  # sft.train_lm's step
        with sft.autocast_context(device, dtype):
            loss = sft.masked_nll(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    tok_s = tokens.numel() / median_seconds(step, device, *run["reps"])
    yield f"pretrain {s['name']}, {s['batch']}x{s['block']} tokens", "tokens/s", tok_s
    yield "  MFU (6N + 12LCT per token)", "%", 100 * tok_s * sft.model_flops_per_token(model.cfg) / run["peak"][dtype]


def bench_generate(device, dtype, run):
    s, new = run["preset"], 64
    model, enc = make_gpt(s, s["prompt"] + new, device)
    model.eval()
    prompt = torch.randint(model.n_out, (s["rollouts"], s["prompt"]), device=device)
    with sft.autocast_context(device, dtype):
        cached = median_seconds(lambda: model.generate(prompt, new, tok.eos_id(enc), tok.pad_id(enc)),
                                device, *run["reps"])
        # no separate warm-up: a run is 64 forwards, and the median drops the first run's
        # one-time costs (every step is a new sequence length)
        recomputed = median_seconds(lambda: generate_without_cache(model, prompt, new), device, 0, run["reps"][1])
    yield f"generate, KV cache, {s['rollouts']} x ({s['prompt']} + {new}) tokens", "new tokens/s", s["rollouts"] * new / cached
    yield "generate, no cache (whole prefix every step)", "new tokens/s", s["rollouts"] * new / recomputed
    yield "  KV cache speed-up", "x", recomputed / cached


def time_ppo_update(s, device, dtype, run):
    """Steady-state PPO updates: one ppo.train_ppo run of warm-up + repeats updates, each
    update's parts read off the stopwatches. Returns the median update's {"total",
    "generate", "rollout", "optimise"} seconds, the (untrained) models, and the PPOConfig.
    Steady state, because a run is many updates: the first one also builds the critic and
    Adam's state and runs the update-0 sanity check, which no later update pays for."""
    T = s["prompt"] + s["response"]
    policy, enc = make_gpt(s, T, device)
    ref = freeze(policy)
    rm = reward.ScalarModel(make_gpt(s, T, device)[0], head_std=0.02).to(device).eval()  # critic: a copy
    prompts = fixed_length_prompts(enc, s["rollouts"], s["prompt"])
    warmup, repeats = run["reps"]
    cfg = ppo.PPOConfig(updates=warmup + repeats, rollouts=s["rollouts"], max_new_tokens=s["response"],
                        eval_every=10 ** 9, minibatch_size=s["minibatch"])
    pol, sec, updates, marks = copy.deepcopy(policy), {}, [], []  # marks: clock + stopwatch totals

    def log(rec):  # called at the end of each update: its parts are the stopwatch increments
        sync(device)
        marks.append(dict(sec, total=time.perf_counter()))
        updates.append({k: v - marks[-2].get(k, 0.0) for k, v in marks[-1].items()})
    with stopwatch(pol, "generate", sec, device), stopwatch(ppo, "rollout", sec, device), \
            stopwatch(ppo, "optimise", sec, device):
        marks.append({"total": time.perf_counter()})
        ppo.train_ppo(pol, ref, rm, enc, prompts, cfg, device, dtype, log=log)
    updates = updates[warmup:]
    sec = sorted(updates, key=lambda x: x["total"])[len(updates) // 2]  # the median update, all its parts
    return sec, {"policy": policy, "reference": ref, "critic": rm, "reward model": rm}, cfg


def ppo_rows(s):
    def bench(device, dtype, run):
        sec, models, cfg = time_ppo_update(s, device, dtype, run)
        T, policy = s["prompt"] + s["response"], models["policy"]
        lm, sc = forward_flops_per_token(policy.cfg), forward_flops_per_token(policy.cfg, lm_head=False)
        n = s["rollouts"] * T  # each token once through: generation, 4 scoring forwards, epochs x fwd+bwd
        flops = n * lm + n * (2 * lm + 2 * sc) + cfg.ppo_epochs * n * 3 * (lm + sc)
        yield (f"PPO {s['name']}, {s['rollouts']} x ({s['prompt']}+{s['response']}), {cfg.ppo_epochs} epochs "
               f"x {s['rollouts'] // s['minibatch']} minibatches", "rollouts/s", s["rollouts"] / sec["total"])
        yield "  s per update", "s", sec["total"]
        yield "  generation", "s", sec["generate"]
        yield "  scoring (4 forwards, decode, checks)", "s", sec["rollout"] - sec["generate"]
        yield "  optimisation", "s", sec["optimise"]
        yield "  other (rewards, GAE, stats)", "s", sec["total"] - sec["rollout"] - sec["optimise"]
        yield "  generation share", "%", 100 * sec["generate"] / sec["total"]
        yield "  update MFU (forward = 2N + 4LCT per token)", "%", 100 * flops / sec["total"] / run["peak"][dtype]
        for name, m in models.items():
            yield f"  parameters: {name}", "M", sum(p.numel() for p in m.parameters()) / 1e6
    return bench


def dpo_rows(s):
    def bench(device, dtype, run):
        T = s["prompt"] + s["response"]
        policy, enc = make_gpt(s, T, device)
        ref = freeze(policy)
        policy.train()
        opt = sft.adamw(policy.parameters(), device, 1e-4)
        tokens = torch.randint(policy.n_out, (s["pairs"], 2, T), device=device)
        mask = torch.zeros(s["pairs"], 2, T - 1, device=device)
        mask[..., s["prompt"] - 1:] = 1.0  # the targets that are response tokens
        t, m = dpo.flatten_pairs(tokens, mask)  # chosen and rejected rows in one batch

        def step():  # dpo.train_dpo's step, with the frozen reference's forward in it
            with torch.inference_mode(), sft.autocast_context(device, dtype):
                ref_logps = dpo.sequence_logps(ref, t, m)
            with sft.autocast_context(device, dtype):
                logps = dpo.sequence_logps(policy, t, m)
            b = s["pairs"]
            losses, _, _ = dpo.dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta=0.1)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        sec = median_seconds(step, device, *run["reps"])
        flops = t.numel() * 4 * forward_flops_per_token(policy.cfg)  # reference forward + policy fwd + bwd
        yield (f"DPO {s['name']}, {s['pairs']} pairs of {s['prompt']}+{s['response']}, ref every step",
               "pairs/s", s["pairs"] / sec)
        yield "  DPO MFU", "%", 100 * flops / sec / run["peak"][dtype]
    return bench


def minibatch_step(device, dtype, left_padded=False, compile=False):
    """Forward + backward of ppo.forward_logp on a PPO minibatch (16 x 40) of the 4 x 128
    model: what ppo.optimise repeats. left_padded: half the rows start with 3 PAD, so the
    attention gets an explicit mask instead of is_causal."""
    model, enc = make_gpt(ISSUE, ISSUE["prompt"] + ISSUE["response"], device)
    tokens = torch.randint(model.n_out, (16, model.cfg.block_size), device=device)
    if left_padded:
        tokens[::2, :3] = tok.pad_id(enc)
    model = torch.compile(model) if compile else model

    def step():
        with sft.autocast_context(device, dtype):
            logp, _ = ppo.forward_logp(model, tokens, tok.pad_id(enc), 1.0)
        model.zero_grad(set_to_none=True)
        logp.sum().backward()
    return step


@contextmanager
def patched(owner, name, value):
    """Temporarily replace owner.<name>: how bench.py times the road not taken."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def fused_sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def bench_attention(device, dtype, run):
    """model.attention's two routes on a PPO minibatch, forward + backward."""
    for left_padded, kind in ((False, "causal"), (True, "pad mask")):
        step = minibatch_step(device, dtype, left_padded)
        yield f"fwd+bwd 4x128, 16x40 ({kind}), model.attention", "ms", 1000 * median_seconds(step, device, *run["reps"])
        with patched(model_py, "attention", fused_sdpa):
            yield f"fwd+bwd 4x128, 16x40 ({kind}), fused SDPA", "ms", 1000 * median_seconds(step, device, *run["reps"])


def bench_ablation(device, dtype, run):
    """One PPO update at the issue's settings with one optimisation undone at a time. The
    variants take turns, one update each per round, so a shared machine's drifts hit all alike."""
    loop_adam = lambda params, device, lr, weight_decay=0.0, **kw: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, **kw)  # sft.adamw's optimiser, not fused
    variants = [("PPO update 4x128 (issue settings), as shipped", None),
                ("  undone: attention: fused SDPA, not written out", (model_py, "attention", fused_sdpa)),
                ("  undone: Adam: PyTorch's loop, not fused", (ppo, "adamw", loop_adam))]
    seconds, one = {name: [] for name, _ in variants}, dict(run, reps=(1, 1))  # a warm-up update, a timed one
    for round_ in range(sum(run["reps"])):
        for name, patch in variants:
            with patched(*patch) if patch else contextlib.nullcontext():
                t = time_ppo_update(ISSUE, device, dtype, one)[0]["total"]
            if round_ >= run["reps"][0]:
                seconds[name].append(t)
    for name, _ in variants:
        yield name, "s", statistics.median(seconds[name])


def bench_compile(device, dtype, run):
    yield "fwd+bwd 4x128, 16x40, eager", "ms", 1000 * median_seconds(minibatch_step(device, dtype), device, *run["reps"])
    try:
        step = minibatch_step(device, dtype, compile=True)
        first = median_seconds(step, device, 0, 1)  # the first call compiles
        ms = 1000 * median_seconds(step, device, *run["reps"])
    except Exception as e:  # no C++ compiler, an unsupported device, ...
        print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        first = ms = None
    yield "fwd+bwd 4x128, 16x40, torch.compile", "ms", ms
    yield "  torch.compile: first call (compiling)", "s", first


# ----------------------------------------------------------------------------- the table

def print_table(rows, dtypes, header):
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    both = len(dtypes) == 2
    lines = [["section", "measurement", "unit", *dtypes] + (["bf16/fp32"] if both else [])]
    for r in rows:
        a, b = r.get("fp32"), r.get("bf16")
        ratio = f"{b / a:.2f}" if both and a and b is not None and r["unit"] not in ("M", "%", "x") else ""
        lines.append([r["section"], r["name"], r["unit"], *(fmt(r.get(d)) for d in dtypes)] + ([ratio] if both else []))
    widths = [max(len(x) for x in col) for col in zip(*lines)]
    print(header)
    for i, line in enumerate(lines):
        print("  ".join(x.ljust(w) if j < 3 else x.rjust(w) for j, (x, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("-" * (sum(widths) + 2 * len(widths) - 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description="leash speed and memory benchmarks (one table)")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 repeats (else 2 + 7), no torch.compile")
    ap.add_argument("--json", action="store_true", help="print {meta, rows} as JSON instead of the table")
    ap.add_argument("--preset", default="auto", help="tiny | cpu | gpu | auto (gpu on cuda, else cpu)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"], help="bf16 means bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--only", default=None, help="comma list of: matmul,pretrain,generate,ppo,dpo,attention,ablation,compile")
    args = ap.parse_args(argv)
    device = train.pick_device(args.device)
    preset = args.preset if args.preset != "auto" else ("gpu" if device == "cuda" else "cpu")
    if preset not in train.PRESETS:
        train.fail(f"--preset {args.preset}: unknown (choose {', '.join(train.PRESETS)} or auto)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    reps = (1, 3) if args.quick else (2, 7)
    p = preset_setting(preset)
    sections = [("matmul", "matmul", bench_matmul), ("pretrain", "pretrain", bench_pretrain),
                ("generate", "generate", bench_generate), ("ppo", "ppo issue", ppo_rows(ISSUE)),
                ("ppo", "ppo issue mb64", ppo_rows(dict(ISSUE, minibatch=64))),
                ("ppo", "ppo preset", ppo_rows(p)), ("dpo", "dpo issue", dpo_rows(ISSUE)),
                ("dpo", "dpo preset", dpo_rows(p)), ("attention", "attention", bench_attention),
                ("ablation", "ablation", bench_ablation),
                ("compile", "compile", bench_compile)]
    known = {key for key, _, _ in sections}
    wanted = set(args.only.split(",")) if args.only else known - ({"compile"} if args.quick else set())
    if wanted - known:
        train.fail(f"--only {args.only}: unknown section(s) {', '.join(sorted(wanted - known))}")
    torch.manual_seed(0)
    t_start, load_start = time.time(), os.getloadavg()[0]
    run = {"reps": reps, "preset": p,
           # a peak is the best rate seen, not a typical one: the best of three medians
           "peak": {d: max(matmul_flops(device, d, 1024, 1024, 1024, 2, max(reps[1], 9)) for _ in range(3))
                    for d in dtypes}}
    rows = {}
    for key, section, bench in sections:
        for dtype in dtypes if key in wanted else []:
            t0 = time.time()
            reset_peak_memory(device)
            for name, unit, value in bench(device, dtype, run):
                rows.setdefault((section, name), {"section": section, "name": name, "unit": unit})[dtype] = value
            rows.setdefault((section, "peak memory"), {"section": section, "name": "  peak memory",
                                                       "unit": "MB"})[dtype] = peak_memory_mb(device)
            print(f"bench: {section}, {dtype}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    meta = {"device": device, "preset": preset, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "warmup": reps[0], "repeats": reps[1],
            "seconds": time.time() - t_start, "load_average": [load_start, os.getloadavg()[0]],
            "memory": "CUDA max allocated" if device == "cuda" else "process peak RSS, per section"}
    if args.json:
        print(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1))
        return
    print_table(list(rows.values()), dtypes,
                f"leash bench: {device} ({meta['cpu_capability']}), {meta['threads']} threads, torch "
                f"{meta['torch']}, preset {preset}; median of {reps[1]} after {reps[0]} warm-up; bf16 = autocast; "
                f"memory = {meta['memory']}; load average {load_start:.1f} -> {meta['load_average'][1]:.1f}; "
                f"{meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
