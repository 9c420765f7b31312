"""
Pretraining and supervised fine-tuning (SFT): the policy before any RLHF.

Both stages minimise the same thing, the cross-entropy of the next token,
    loss = - sum_t mask_t * log pi(x_{t+1} | x_<=t) / sum_t mask_t,
and differ only in the data and the mask:
  * pretraining: random windows of the corpus (reviews joined by EOS), mask = 1;
  * SFT: one example per row, prompt + completion + EOS, right-padded with PAD;
    mask = 1 only where the target is a completion token (EOS included), so the
    model learns to answer a prompt and to stop, not to write prompts.
The loop is nanoGPT's: AdamW, linear warmup then cosine decay, gradient clipping,
a held-out loss now and then, one progress line per log step.
"""
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from model import GPT, GPTConfig
from reference import gather_logprobs
import tokenizer as tok


# ----------------------------------------------------------------------------- data

def encode_stream(enc, texts):
    """All texts, each followed by EOS, as one 1-D LongTensor (the pretraining corpus)."""
    eos = tok.eos_id(enc)
    ids = []
    for t in texts:
        ids.extend(tok.encode(enc, t))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def stream_batch(stream, batch_size, block_size, gen):
    """Random windows of the stream: tokens (B, block_size) and an all-ones mask (B, block_size-1)."""
    starts = torch.randint(len(stream) - block_size, (batch_size,), generator=gen)
    tokens = torch.stack([stream[s:s + block_size] for s in starts])
    return tokens, torch.ones(batch_size, block_size - 1)


def encode_pairs(enc, pairs, block_size):
    """SFT examples: tokens (N, T) right-padded with PAD and a loss mask (N, T-1) that is 1
    where the target is a completion token or the final EOS. Pairs that do not fit in
    block_size are dropped (and counted), never silently truncated."""
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    rows, prompt_lens = [], []
    for prompt, completion in pairs:
        p = tok.encode(enc, prompt)
        ids = p + tok.encode(enc, completion) + [eos]
        if len(ids) <= block_size:
            rows.append(ids)
            prompt_lens.append(len(p))
    if not rows:
        raise ValueError(f"no SFT example fits in block_size={block_size}")
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1)
    for i, (r, p) in enumerate(zip(rows, prompt_lens)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, p - 1:len(r) - 1] = 1.0  # targets r[p:], i.e. completion tokens and EOS
    return tokens, mask, len(pairs) - len(rows)


def rows_batch(tokens, mask, batch_size, gen):
    idx = torch.randint(len(tokens), (batch_size,), generator=gen)
    return tokens[idx], mask[idx]


# ----------------------------------------------------------------------------- loss

def masked_nll(model, tokens, mask):
    """Mean negative log-likelihood over the masked targets. tokens (B, T), mask (B, T-1).
    Right padding needs no attention mask: causal attention never looks right."""
    logp = gather_logprobs(model(tokens)[:, :-1], tokens[:, 1:])
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def lr_at(step, max_steps, lr, warmup):
    """Linear warmup to lr, then cosine decay to lr / 10 (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast_context(device, dtype):
    """bf16 autocast where asked (matmuls in bf16, reductions and losses stay fp32)."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def adamw(params, device, lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019) as one fused kernel where PyTorch has it (CPU, CUDA):
    for PPO's policy + critic (2 x 0.86M parameters) a step took 2.4 ms against 6.6 ms for
    PyTorch's loop over parameters, measured on this project's CPU."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 50


def train_lm(model, get_batch, get_val_batch, cfg: TrainConfig, device="cpu", dtype="fp32",
             stage="pretrain", log=print, peak_flops=None, compile=False):
    """The training loop shared by pretraining and SFT. Returns the final held-out loss.

    get_batch() / get_val_batch() -> (tokens (B, T), mask (B, T-1)) on any device.
    log(dict) receives one record per log step (stage, step, loss, val_loss, lr, ...).
    """
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                 {"params": no_decay, "weight_decay": 0.0}], device, cfg.lr)
    ctx = autocast_context(device, dtype)
    # torch.compile wraps the module; the weights stay shared, so `model` is what gets saved.
    fast = torch.compile(model) if compile else model

    @torch.no_grad()
    def val_loss():
        model.eval()
        with ctx:
            losses = [masked_nll(model, *(t.to(device) for t in get_val_batch())).item()
                      for _ in range(cfg.eval_batches)]
        model.train()
        return sum(losses) / len(losses)

    t0 = t_last = time.time()
    tokens_seen, vl = 0, float("nan")
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        tokens, mask = (t.to(device) for t in get_batch())
        with ctx:
            loss = masked_nll(fast, tokens, mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens_seen += tokens.numel()
        last = step == cfg.steps - 1
        if step % cfg.eval_every == 0 or last:
            vl = val_loss()
        if step % cfg.log_every == 0 or last:
            now = time.time()
            n = cfg.log_every if step else 1
            dt = (now - t_last) / n
            t_last = now
            tok_per_s = tokens_seen / (now - t0)
            mfu = model_flops_per_token(model.cfg) * tok_per_s / peak_flops if peak_flops else float("nan")
            eta = (now - t0) / (step + 1) * (cfg.steps - step - 1)
            log({"stage": stage, "step": step, "loss": loss.item(), "val_loss": vl,
                 "lr": opt.param_groups[0]["lr"], "ms_per_step": 1000 * dt,
                 "tok_per_s": tok_per_s, "mfu": mfu, "eta_s": eta})
    model.eval()
    return vl


def matmul_peak_flops(device="cpu", dtype="fp32", n=1024, repeats=10):
    """The achievable matmul rate (FLOP/s) of this device and dtype, measured now: the
    denominator of MFU. Measured rather than looked up, because a laptop CPU has no
    datasheet number and a shared machine has less than its datasheet says."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 2):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        if i >= 2:  # the first two are warm-up
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)  # the best run: a peak, not a typical rate


def model_flops_per_token(cfg: GPTConfig):
    """Training FLOPs per token, forward + backward (PaLM appendix B; nanoGPT's count):
    6 * parameters + 12 * layers * width * context for attention."""
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, meta=None):
    """Write atomically: a temporary file in the same folder, then rename over `path`,
    so a kill mid-write never leaves a half-written checkpoint behind."""
    state = {"config": asdict(model.cfg), "model": model.state_dict(), "meta": meta or {}}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write died half-way: drop the pieces, keep the old file
            os.remove(tmp)


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, tokenizer) from a checkpoint and the tokenizer.json beside it.
    Raises ValueError with one line naming the file if it is missing or unreadable."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**state["config"]))
        model.load_state_dict(state["model"])
    except Exception as e:  # a corrupt file, or one from another config
        raise ValueError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    enc = tok.load_tokenizer(os.path.join(os.path.dirname(path) or ".", "tokenizer.json"))
    return model.to(device).eval(), enc
