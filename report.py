"""What a run shows: progress lines (with MFU), the table, samples.md, plots."""
import json
import os
import pathlib
import time

import torch

from model import atomic_write


def flops_per_token(cfg):
    """Training FLOPs per token, forward + backward (PaLM appendix B; nanoGPT's
    count): 6 * parameters + 12 * layers * width * context for attention."""
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def matmul_peak_flops(device="cpu", dtype="fp32", repeats=10):
    """Best FLOP/s of a square matmul on this device and dtype, measured now:
    MFU's denominator (a laptop has no datasheet, a shared machine gives less)."""
    cuda = torch.device(device).type == "cuda"
    n, inner = (4096, 10) if cuda else (1024, 1)  # GPU: 10 per timing, sync amortised
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(2, n, n, device=device, dtype=kind)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for _ in range(repeats + 2):  # the first two are warm-up
        sync()
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        times.append((time.perf_counter() - t) / inner)
    return 2 * n ** 3 / min(times[2:])


class Logger:
    """Writes each record to metrics.jsonl and prints one line of the keys to
    watch (tok_per_s as MFU too); with main False (not rank 0), neither."""
    SHOW = ("loss val_loss accuracy val_accuracy margin proxy_reward gold_reward "
            "kl_exact kl_max beta entropy clipfrac approx_kl explained_variance "
            "valid_rate length").split()
    UNITS = {"ms_per_step": "{:.0f} ms/step", "seconds": "{:.2f} s/update",
             "pairs_per_s": "{:.0f} pairs/s", "tok_per_s": "{:.0f} tok/s",
             "mfu": "mfu {:.1f}%", "eta_s": "eta {:.0f}s"}

    def __init__(self, out, flops_per_token=None, peak_flops=None, main=True):
        self.path = os.path.join(out, "metrics.jsonl")
        self.flops, self.peak = flops_per_token, peak_flops
        self.main = main

    def start(self, config):
        """Each run opens with a {"stage": "run"} record: a re-run appends."""
        self({"stage": "run", "step": 0, "time": time.time(), "config": config}, show=False)

    def __call__(self, rec, show=True):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if "tok_per_s" in rec and self.peak:  # MFU is shown, not written
            rec = {**rec, "mfu": 100 * self.flops * rec["tok_per_s"] / self.peak}
        if not show:
            return
        parts = [f"{rec['stage']:>9} {rec['step']:>5}"]
        parts += [f"{k} {rec[k]:.4g}" for k in self.SHOW if isinstance(rec.get(k), float)]
        parts += [spec.format(rec[k]) for k, spec in self.UNITS.items() if k in rec]
        print(" | ".join(parts), flush=True)
        evals = [f"{k[5:]} {v:.3f}" for k, v in rec.items()
                 if k[:5] == "eval_" and isinstance(v, float)]
        if evals:  # the periodic evaluation on the held-out prompts
            print(" " * 16 + "eval: " + "  ".join(evals), flush=True)


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


def write_json(path, obj):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def comparison_table(summary):
    """A markdown table of every policy's figures on the evaluation prompts."""
    dpo = "DPO + NLL (RPO)" if (summary.get("dpo") or {}).get("sft_coef") else "DPO"
    header = ("| policy | gold reward | proxy reward | KL to ref (nats) "
              "| valid | distinct-2 | seconds |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    rows = (("SFT", "sft"), ("PPO", "ppo"), ("PPO, beta=0", "ppo_beta0"),
            ("GRPO", "grpo"), (dpo, "dpo"), ("online DPO", "dpo_online"))
    for label, key in rows:
        if m := summary.get(key):
            cells = [label, f"{m['gold_reward']:.3f}", fmt(m.get("proxy_reward")),
                     fmt(m.get("kl"), ".2f"), fmt(m.get("valid_rate")),
                     f"{m['distinct_2']:.3f}", fmt(m.get("seconds"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_samples(path, prompts, columns, gold_fn, valid_fn, n=12):
    """samples.md: the same evaluation prompts answered by each policy."""
    out = ["# Samples on the evaluation prompts", "",
           "Temperature 1, no top-k / top-p. Each answer: [gold reward, valid] text."]
    for i, prompt in enumerate(prompts[:n]):
        out += ["", f"## `{prompt}`"]
        for name, texts in columns.items():
            valid = "n/a"
            if valid_fn is not None:
                valid = "valid" if valid_fn(texts[i]) else "INVALID"
            out.append(f"- **{name}** [{gold_fn(texts[i]):+.2f}, {valid}] {texts[i]}")
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(out) + "\n"))


def plot_rl(history, path, title):
    """KL and beta, and proxy reward, gold reward and validity, by update."""
    from matplotlib.figure import Figure  # no pyplot: no GUI, nothing to close
    steps = [h["step"] for h in history]
    series = lambda key: [h[key] for h in history]
    ax1, ax2 = Figure(figsize=(11, 4), layout="tight").subplots(1, 2)
    ax1.plot(steps, series("kl_exact"), label="exact KL (nats/seq)")
    ax1.plot(steps, series("kl"), alpha=0.5, label="k1 estimate")
    ax1.set(xlabel="update", ylabel="KL(pi || pi_ref)", title=f"{title}: KL and beta")
    ax1.legend(loc="upper left")
    ax1b = ax1.twinx()
    ax1b.plot(steps, series("beta"), color="tab:red", label="beta")
    ax1b.set_ylabel("beta", color="tab:red")
    ax2.plot(steps, series("proxy_reward"), "-", steps, series("gold_reward"), "-",
             steps, series("valid_rate"), ":")
    ax2.set(xlabel="update", title=f"{title}: rewards on training rollouts")
    ax2.legend(["proxy (reward model)", "gold (the world)", "valid rate"])
    ax1.figure.savefig(path, dpi=100)
