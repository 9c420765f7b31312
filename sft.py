"""Pretraining and supervised fine-tuning (SFT): the policy before any RLHF. Both minimise the next-token
cross-entropy and differ only in the data and the mask:
    loss = - sum_t mask_t * log pi(x_{t+1} | x_<=t) / sum_t mask_t
  * pretraining: random windows of the corpus (texts joined by EOS), mask = 1;
  * SFT: a prompt + completion + EOS per row, right-padded with PAD; mask = 1 where the target is a
    completion token or the EOS, so the model learns to answer a prompt and to stop, not to write prompts.
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
    eval_every: int = 100      # steps between held-out losses
    eval_batches: int = 8
    log_every: int = 50


def encode_stream(enc, texts):
    """All texts, each followed by EOS, as one 1-D LongTensor (the pretraining corpus)."""
    return torch.tensor([i for t in texts for i in tok.encode(enc, t) + [tok.eos_id(enc)]], dtype=torch.long)


def stream_batch(stream, batch_size, block_size, gen):
    """Random windows of the stream: tokens (B, block_size), an all-ones mask (B, block_size - 1)."""
    starts = torch.randint(len(stream) - block_size, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + block_size] for s in starts]), torch.ones(batch_size, block_size - 1)


def rows_batch(tokens, mask, batch_size, gen):
    """Random rows of an encoded dataset: tokens (B, T), mask (B, T-1)."""
    idx = torch.randint(len(tokens), (batch_size,), generator=gen)
    return tokens[idx], mask[idx]


def masked_nll(model, tokens, mask):
    """Mean NLL over the masked targets; tokens (B, T), mask (B, T-1), right-padded: no attention mask.
    Data-parallel: this rank's term of the mean over every rank's targets (dist.rank_weight)."""
    nll = -(token_logprobs(model, tokens) * mask).sum() / mask.sum().clamp(min=1)
    return nll * dist.rank_weight(mask.sum())


def lr_at(step, max_steps, lr, warmup):
    """Linear warmup to lr, then cosine decay to lr / 10 (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * progress))


def train_lm(model, get_batch, get_val_batch, cfg: TrainConfig, device="cpu", dtype="fp32",
             stage="pretrain", log=print, compile=False):
    """nanoGPT's loop, shared by pretraining and SFT: trains `model` in place, returns the last held-out loss.
    get_batch() / get_val_batch() -> (tokens (B, T), mask (B, T-1)); log(dict) gets a record per log step.
    Data-parallel, every rank draws the same global batch and trains on its rows (dist.shard)."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on biases and LayerNorms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = adamw([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}], device, cfg.lr)
    fast = torch.compile(model) if compile else model  # shares the weights: save `model`
    t0, t_log, tokens_seen, vl = time.time(), 0.0, 0, float("nan")  # t_log: seconds since t0 at the last log
    mine = lambda batch: (t[dist.shard(len(t))].to(device) for t in batch)  # this rank's rows, on the device
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        batch = get_batch()
        tokens, mask = mine(batch)
        with autocast(device, dtype):
            loss = masked_nll(fast, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens_seen += batch[0].numel()  # every rank's
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                vl = dist.all_mean(torch.stack([masked_nll(model, *mine(get_val_batch()))
                                                for _ in range(cfg.eval_batches)]).mean()).item()
            model.train()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed, loss = time.time() - t0, dist.all_mean(loss.detach()).item()  # over all ranks
            if not math.isfinite(loss):
                raise FloatingPointError(f"{stage}: loss became {loss} at step {step}")
            log({"stage": stage, "step": step, "loss": loss, "val_loss": vl, "lr": opt.param_groups[0]["lr"],
                 "ms_per_step": 1000 * (elapsed - t_log) / (cfg.log_every if step else 1),
                 "tok_per_s": tokens_seen / elapsed, "eta_s": elapsed / (step + 1) * (cfg.steps - step - 1)})
            t_log = elapsed
    model.eval()
    return vl


def pretrain(model, enc, texts, cfg: TrainConfig, device, dtype, log, seed, compile=False):
    """Next-token pretraining on the texts (the last 10% of the stream held out). Returns val loss."""
    stream, T = encode_stream(enc, texts), model.cfg.block_size
    if len(stream) < 20 * T:
        raise ValueError(f"the text is too short: {len(stream)} tokens for block size {T}")
    n_val, gen = len(stream) // 10, torch.Generator().manual_seed(seed)
    return train_lm(model, lambda: stream_batch(stream[:-n_val], cfg.batch_size, T, gen),
                    lambda: stream_batch(stream[-n_val:], cfg.batch_size, T, gen),
                    cfg, device, dtype, "pretrain", log, compile)


def finetune(model, enc, pairs, cfg: TrainConfig, device, dtype, log, seed, compile=False):
    """SFT on (prompt, completion) pairs (the first 10% held out). Returns the held-out loss."""
    tokens, mask, _ = tok.encode_batch(enc, *zip(*pairs), model.cfg.block_size)
    n_val, gen = len(tokens) // 10, torch.Generator().manual_seed(seed)
    return train_lm(model, lambda: rows_batch(tokens[n_val:], mask[n_val:], cfg.batch_size, gen),
                    lambda: rows_batch(tokens[:n_val], mask[:n_val], cfg.batch_size, gen),
                    cfg, device, dtype, "sft", log, compile)
