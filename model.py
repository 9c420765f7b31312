"""
The GPT: a small decoder-only transformer in the style of nanoGPT / GPT-2.

Pre-LayerNorm blocks, causal self-attention (`attention`: PyTorch's fused kernel
on a GPU, the formula written out on a CPU), a GELU MLP, learned absolute positions
and an output head tied to the token embedding (Press & Wolf, 2017). Dropout is 0 by
default because RL needs the log-probs of the sampling policy and of the trained policy
to agree exactly.

Two things RLHF needs beyond nanoGPT:
  * left-padded batches. Prompts have different lengths, so a batch of prompts is
    padded on the left with PAD and every row's positions start at its first real
    token. `pad_mask` (B, T), True on real tokens, carries this through.
  * `generate()` with a KV cache that also returns the log-probability of every
    sampled token, and `trunk()` (the final hidden states) so that a scalar head
    (reward model, critic) can sit on the same body.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64      # longest sequence (prompt + response) the model sees
    vocab_size: int = 512     # padded up to a multiple of 64 (tokenizer.padded_vocab_size)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0      # residual dropout; keep 0 for RL: sampling and training must see the same model
    bias: bool = True
    n_out: int = 0            # ids the model may output: [0, n_out); 0 means all. PAD (the
                              # tokenizer's last id) and the vocabulary's padding lie beyond it,
                              # so they can never be sampled and need no masking anywhere.


def positions_and_mask(pad_mask):
    """From a (B, T) bool pad mask: positions (B, T) counted from each row's first real
    token, and a boolean attention mask (B, 1, T, T) that is causal and hides padding.
    Each query may always see itself, so a pure-padding row never becomes all -inf."""
    T = pad_mask.shape[1]
    pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=pad_mask.device).tril()
    attn = causal & pad_mask[:, None, None, :]
    attn = attn | torch.eye(T, dtype=torch.bool, device=pad_mask.device)
    return pos, attn


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v over the keys each query may see (Vaswani et al. 2017, eq. 1).

    q (B, H, T, d); k, v (B, H, S, d); mask None (plain causal, T == S) or bool broadcastable
    to (B, H, T, S), True where a query may look. Returns (B, H, T, d).
    Two routes to the same numbers up to rounding: PyTorch's fused kernel, and the formula
    written out (under bf16 autocast its softmax runs in bf16; the logits after it are
    within 0.02 of fp32's, the fused kernel's within 0.015).
    On a CPU the written-out one is within ~10% in fp32 and twice as fast in bf16 (bench.py,
    "attention": the fused kernel's bf16 backward is slow at these small shapes); on a GPU
    the fused kernel never builds the (T, S) score matrix, so it wins there."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    T, S = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return weights @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.block_size = cfg.block_size
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, attn_mask=None, cache=None):
        """x: (B, T, C). attn_mask: None (plain causal) or bool (B, 1, T, T_total).
        cache: None, or a dict holding this layer's keys/values so far; it is extended."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            # Room for the whole block is taken once and filled in place: growing the
            # cache with torch.cat copied it at every step (half of generate()'s time).
            if "k" not in cache:
                cache["k"] = k.new_empty(B, self.n_head, self.block_size, C // self.n_head)
                cache["v"], cache["len"] = torch.empty_like(cache["k"]), 0
            n = cache["len"] + T
            cache["k"][:, :, n - T:n], cache["v"][:, :, n - T:n] = k, v
            k, v, cache["len"] = cache["k"][:, :, :n], cache["v"][:, :, :n], n
        y = attention(q, k, v, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln1(x), attn_mask, cache)
        x = x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.n_out = cfg.n_out or cfg.vocab_size
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the
        # residual stream does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters, leaving out the position embedding (nanoGPT's convention)."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def trunk(self, idx, pad_mask=None, cache=None, pos=None, attn_mask=None):
        """Final hidden states (B, T, C) after the last LayerNorm.
        idx: (B, T) token ids. pad_mask: (B, T) bool, True on real tokens, or None
        when no row has left padding (then plain causal attention, the fast path)."""
        B, T = idx.shape
        if pad_mask is not None and attn_mask is None:
            pos, attn_mask = positions_and_mask(pad_mask)
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i])
        return self.ln_f(x)

    def lm_head(self, h):
        """Next-token logits (..., n_out) from hidden states, with the output matrix tied
        to the token embedding (Press & Wolf, 2017)."""
        return F.linear(h, self.wte.weight[:self.n_out])

    def forward(self, idx, pad_mask=None):
        """Logits (B, T, n_out) for the next token at every position."""
        return self.lm_head(self.trunk(idx, pad_mask))

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None):
        """Sample continuations of a left-padded batch of prompts, with a KV cache.

        prompt: (B, P) ids, left-padded with pad_id. Returns
          tokens (B, P + N): prompt then response; after a row's EOS only pad_id.
          logp   (B, N) fp32: log pi(token) of each sampled token under the same
                 temperature-scaled distribution it was drawn from; 0 after EOS.
        N <= max_new_tokens (the loop stops early once every row has ended).
        Sampling is plain temperature sampling: no top-k / top-p unless asked,
        because RL needs the log-probs of the very distribution it samples from.
        """
        B, P = prompt.shape
        assert P + max_new_tokens <= self.cfg.block_size, "prompt + response longer than block_size"
        pad_mask = prompt != pad_id
        pos, attn = positions_and_mask(pad_mask)
        cache = [dict() for _ in self.blocks]
        h = self.trunk(prompt, cache=cache, pos=pos, attn_mask=attn)[:, -1]
        next_pos = pos[:, -1] + 1
        # which cached keys are real tokens: the prompt's, then every generated one
        key_mask = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=prompt.device)
        key_mask[:, :P] = pad_mask
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        out_tokens, out_logp = [], []
        for step in range(max_new_tokens):
            logits = self.lm_head(h).float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            logprobs = F.log_softmax(logits, dim=-1)
            # Inverse-CDF sampling: the first token whose cumulative probability exceeds a
            # uniform draw. The same distribution as torch.multinomial, which draws one
            # exponential per vocabulary entry and was 6% of generate()'s time in a profile.
            cdf = logprobs.exp().cumsum(-1)
            total = cdf[:, -1:].contiguous()  # rounding can leave it a little off 1
            u = torch.rand(B, 1, device=cdf.device) * total
            tok = torch.searchsorted(cdf, u, right=True).squeeze(1)  # right: a zero-probability id is never hit
            # ...except if u rounds up to the total (about once in 2^24 draws): then take the
            # last id with any probability (the first one whose cdf reaches the total)
            tok = torch.minimum(tok, torch.searchsorted(cdf, total).squeeze(1))
            lp = logprobs.gather(1, tok[:, None]).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out_tokens.append(tok)
            out_logp.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | (tok == eos_id)
            if bool(done.all()):
                break
            # Decode one step: the new token attends to every real cached key and itself.
            h = self.trunk(tok[:, None], cache=cache, pos=next_pos[:, None],
                           attn_mask=key_mask[:, None, None, :P + step + 1])[:, -1]
            next_pos = next_pos + 1
        tokens = torch.cat([prompt, torch.stack(out_tokens, 1)], dim=1)
        return tokens, torch.stack(out_logp, 1)
