"""What a run shows a person: progress lines (with MFU), the comparison table, samples.md, RL plots."""
import json
import os
import pathlib
import time

import torch

from model import atomic_write


def flops_per_token(cfg):
    """Training FLOPs per token, forward + backward (PaLM appendix B; nanoGPT's count):
    6 * parameters + 12 * layers * width * context for attention."""
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def matmul_peak_flops(device="cpu", dtype="fp32", repeats=10):
    """The best FLOP/s of a square matmul on this device and dtype, measured now: the denominator of MFU
    (a laptop CPU has no datasheet figure, a shared machine has less than it says). On a GPU the matrices
    are 4096 wide and timed 10 at a time, so that launch and sync do not count."""
    cuda = torch.device(device).type == "cuda"
    n, inner = (4096, 10) if cuda else (1024, 1)
    a, b = torch.randn(2, n, n, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
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
    """Writes each record to metrics.jsonl and prints one line of the keys to watch (tok_per_s as MFU too);
    with main False (a data-parallel rank other than 0) it does neither."""
    SHOW = ("loss val_loss accuracy val_accuracy margin proxy_reward gold_reward kl_exact kl_max beta "
            "entropy clipfrac approx_kl explained_variance valid_rate length").split()
    UNITS = {"ms_per_step": "{:.0f} ms/step", "seconds": "{:.2f} s/update", "pairs_per_s": "{:.0f} pairs/s",
             "tok_per_s": "{:.0f} tok/s", "mfu": "mfu {:.1f}%", "eta_s": "eta {:.0f}s"}

    def __init__(self, out, flops_per_token=None, peak_flops=None, main=True):
        self.path, self.flops, self.peak = os.path.join(out, "metrics.jsonl"), flops_per_token, peak_flops
        self.main = main

    def start(self, config):
        """A re-run into the same folder appends, so each run opens with a {"stage": "run"} record."""
        self({"stage": "run", "step": 0, "time": time.time(), "config": config}, show=False)

    def __call__(self, rec, show=True):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if "tok_per_s" in rec and self.peak:  # MFU is shown, not written
            rec = {**rec, "mfu": 100 * self.flops * rec["tok_per_s"] / self.peak}
        if show:
            parts = [f"{k} {rec[k]:.4g}" for k in self.SHOW if isinstance(rec.get(k), float)]
            parts += [spec.format(rec[k]) for k, spec in self.UNITS.items() if k in rec]
            print(" | ".join([f"{rec['stage']:>9} {rec['step']:>5}"] + parts), flush=True)
            evals = [f"{k[5:]} {v:.3f}" for k, v in rec.items() if k[:5] == "eval_" and isinstance(v, float)]
            if evals:  # the periodic evaluation on the held-out prompts
                print(" " * 16 + "eval: " + "  ".join(evals), flush=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """obj as indented JSON at path, written atomically (a crash leaves the old file or the new one)."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def comparison_table(summary):
    """A markdown table of every policy's figures on the evaluation prompts."""
    dpo = "DPO + NLL (RPO)" if (summary.get("dpo") or {}).get("sft_coef") else "DPO"  # dpo.DPOConfig
    lines = ["| policy | gold reward | proxy reward | KL to ref (nats) | valid | distinct-2 | seconds |",
             "|---|---|---|---|---|---|---|"]
    rows = (("SFT", "sft"), ("PPO", "ppo"), ("PPO, beta=0", "ppo_beta0"), ("GRPO", "grpo"), (dpo, "dpo"),
            ("online DPO", "dpo_online"))
    for label, key in rows:
        if m := summary.get(key):
            lines.append(f"| {label} | {m['gold_reward']:.3f} | {fmt(m.get('proxy_reward'))} "
                         f"| {fmt(m.get('kl'), '.2f')} | {fmt(m.get('valid_rate'))} | {m['distinct_2']:.3f} "
                         f"| {fmt(m.get('seconds'), '.0f')} |")
    return "\n".join(lines)


def write_samples(path, prompts, columns, gold_fn, valid_fn, n=12):
    """samples.md: the same evaluation prompts answered by each policy, side by side."""
    out = ["# Samples on the evaluation prompts", "",
           "Temperature 1, no top-k / top-p. Each answer: [gold reward, valid] text."]
    for i, prompt in enumerate(prompts[:n]):
        out += ["", f"## `{prompt}`"]
        for name, texts in columns.items():
            valid = "n/a" if valid_fn is None else ("valid" if valid_fn(texts[i]) else "INVALID")
            out.append(f"- **{name}** [{gold_fn(texts[i]):+.2f}, {valid}] {texts[i]}")
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(out) + "\n"))


def plot_rl(history, path, title):
    """KL and beta over updates, and proxy reward, gold reward and validity over updates."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    steps = [h["step"] for h in history]
    ax1, ax2 = Figure(figsize=(11, 4), layout="tight").subplots(1, 2)
    ax1.plot(steps, [h["kl_exact"] for h in history], label="exact KL (nats/seq)")
    ax1.plot(steps, [h["kl"] for h in history], alpha=0.5, label="k1 estimate")
    ax1.set(xlabel="update", ylabel="KL(pi || pi_ref)", title=f"{title}: KL and beta")
    ax1.legend(loc="upper left")
    ax1b = ax1.twinx()
    ax1b.plot(steps, [h["beta"] for h in history], color="tab:red", label="beta")
    ax1b.set_ylabel("beta", color="tab:red")
    ax2.plot(steps, [h["proxy_reward"] for h in history], "-", steps, [h["gold_reward"] for h in history],
             "-", steps, [h["valid_rate"] for h in history], ":")
    ax2.set(xlabel="update", title=f"{title}: rewards on training rollouts")
    ax2.legend(["proxy (reward model)", "gold (the world)", "valid rate"])
    ax1.figure.savefig(path, dpi=100)
