"""Pretraining and supervised fine-tuning (SFT): the policy before any RLHF.
Both minimise the next-token cross-entropy; only the data and the mask differ:

    loss = - sum_t mask_t * log pi(x_{t+1} | x_<=t) / sum_t mask_t

  * pretraining: random windows of the corpus (texts joined by EOS), mask = 1;
  * SFT: prompt + completion + EOS per row, right-padded with PAD; mask = 1 on
    the completion + EOS: it learns to answer and stop, not to write prompts.
"""
import math
import time
from dataclasses import dataclass

import torch

import dist
import tokenizer as tok
from model import adamw, autocast
from reference import token_logprobs


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100  # steps between held-out losses
    eval_batches: int = 8
    log_every: int = 50


def encode_stream(enc, texts):
    """The pretraining corpus: every text + EOS, one 1-D LongTensor."""
    ids = [i for t in texts for i in tok.encode(enc, t) + [tok.eos_id(enc)]]
    return torch.tensor(ids, dtype=torch.long)


def stream_batch(stream, batch_size, block_size, gen):
    """Random windows of the stream: tokens (B, T), all-ones mask (B, T-1)."""
    starts = torch.randint(len(stream) - block_size, (batch_size,), generator=gen)
    tokens = torch.stack([stream[s:s + block_size] for s in starts])
    return tokens, torch.ones(batch_size, block_size - 1)


def rows_batch(tokens, mask, batch_size, gen):
    """Random rows of an encoded dataset: tokens (B, T), mask (B, T-1)."""
    idx = torch.randint(len(tokens), (batch_size,), generator=gen)
    return tokens[idx], mask[idx]


def masked_nll(model, tokens, mask):
    """Mean NLL over the masked targets; tokens (B, T), mask (B, T-1),
    right-padded: no attention mask."""
    return dist.masked_mean(-token_logprobs(model, tokens), mask)


def pretraining_loss(enc, texts, batch_size, block_size, seed, device, dtype):
    """PPO-ptx's term (Ouyang et al. 2022, eq. 2): model -> the mean NLL of
    a fresh batch of random windows of the pretraining corpus `texts`."""
    stream = encode_stream(enc, texts)
    gen = torch.Generator().manual_seed(seed)

    def loss(model):
        tokens, mask = stream_batch(stream, batch_size, block_size, gen)
        with autocast(device, dtype):
            return masked_nll(model, tokens.to(device), mask.to(device))
    return loss


def lr_at(step, max_steps, lr, warmup):
    """nanoGPT's schedule: linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * progress))


def set_lr(opt, step, max_steps, cfg):
    """Every param group's lr for this step: lr_at with cfg.lr, cfg.warmup."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, max_steps, cfg.lr, cfg.warmup)


def train_lm(model, get_batch, get_val_batch, cfg: TrainConfig, device="cpu",
             dtype="fp32", stage="pretrain", log=print, compile=False):
    """nanoGPT's loop (pretrain, SFT): trains `model` in place on get_batch()
    -> (tokens (B, T), mask (B, T-1)), returns the last held-out loss."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases, norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}]
    opt = adamw(groups, device, cfg.lr)
    fast = torch.compile(model) if compile else model  # same weights
    my_rows = lambda batch: [t[dist.shard(len(t))].to(device) for t in batch]

    start = time.time()
    last_log = 0.0  # the last log's time since start
    tokens_seen = 0
    val_loss = float("nan")
    for step in range(cfg.steps):
        set_lr(opt, step, cfg.steps, cfg)
        batch = get_batch()
        with autocast(device, dtype):
            loss = masked_nll(fast, *my_rows(batch))
        dist.step(loss, opt, cfg.grad_clip)
        tokens_seen += batch[0].numel()
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:  # held-out loss
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                losses = [masked_nll(model, *my_rows(get_val_batch()))
                          for _ in range(cfg.eval_batches)]
            val_loss = dist.all_mean(torch.stack(losses).mean()).item()
            model.train()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.time() - start
            mean_loss = dist.all_mean(loss.detach()).item()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"{stage}: loss became {mean_loss} at step {step}")
            n_steps = cfg.log_every if step else 1  # since the last log
            log({"stage": stage, "step": step, "loss": mean_loss,
                 "val_loss": val_loss, "lr": opt.param_groups[0]["lr"],
                 "ms_per_step": 1000 * (elapsed - last_log) / n_steps,
                 "tok_per_s": tokens_seen / elapsed,
                 "eta_s": elapsed / (step + 1) * (cfg.steps - step - 1)})
            last_log = elapsed
    model.eval()
    return val_loss


def pretrain(model, enc, texts, cfg: TrainConfig, device, dtype, log, seed, compile=False):
    """Pretraining, the stream's last 10% held out -> the held-out loss."""
    stream = encode_stream(enc, texts)
    T = model.cfg.block_size
    if len(stream) < 20 * T:
        raise ValueError(f"the text is too short: {len(stream)} tokens for block size {T}")
    n_val = len(stream) // 10
    gen = torch.Generator().manual_seed(seed)
    get_train = lambda: stream_batch(stream[:-n_val], cfg.batch_size, T, gen)
    get_val = lambda: stream_batch(stream[-n_val:], cfg.batch_size, T, gen)
    return train_lm(model, get_train, get_val, cfg, device, dtype, "pretrain", log, compile)


def finetune(model, enc, pairs, cfg: TrainConfig, device, dtype, log, seed, compile=False):
    """SFT on (prompt, completion) pairs, first 10% held out -> val loss."""
    tokens, mask, _ = tok.encode_batch(enc, *zip(*pairs), model.cfg.block_size)
    n_val = len(tokens) // 10
    gen = torch.Generator().manual_seed(seed)
    get_train = lambda: rows_batch(tokens[n_val:], mask[n_val:], cfg.batch_size, gen)
    get_val = lambda: rows_batch(tokens[:n_val], mask[:n_val], cfg.batch_size, gen)
    return train_lm(model, get_train, get_val, cfg, device, dtype, "sft", log, compile)
