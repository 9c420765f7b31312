"""The GPT: a decoder-only transformer like nanoGPT and GPT-2 (pre-LayerNorm
blocks, causal self-attention, a GELU MLP, learned positions, an output head
tied to the token embedding, Press & Wolf 2017), and what stages do with one.
"""
import copy
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64  # longest sequence (prompt + response) seen
    vocab_size: int = 1024  # tokenizer ids, padded to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # keep 0 for RL: sampling and training must see one model
    bias: bool = True
    n_out: int = 0  # outputs [0, n_out) (0: all): never PAD (last id) or padding rows
    fused_attention: bool | None = None  # None: by device (`attention`)


def positions_and_mask(pad_mask):
    """pad_mask (B, T), True on real tokens (RLHF left-pads prompts) -> positions
    (B, T) from each row's first real token, bool attention mask (B, 1, T, T):
    causal, padding hidden, each query sees itself (no 0/0 on all-PAD rows)."""
    T = pad_mask.shape[1]
    pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    causal = pad_mask.new_ones(T, T).tril()
    itself = torch.eye(T, dtype=torch.bool, device=pad_mask.device)
    return pos, (causal & pad_mask[:, None, None, :]) | itself


def attention(q, k, v, mask=None, fused=None):
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1): q (B, H, T, d), k, v
    (B, H, S, d) -> (B, H, T, d). mask: None (causal, T == S) or bool, broadcastable to
    (B, H, T, S), True where a query may look. fused: PyTorch's kernel (no (T, S) scores,
    best on GPUs) or written out (faster on CPUs, docs/performance.md); None: by device."""
    if fused or (fused is None and q.device.type != "cpu"):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None)
    if mask is None:
        mask = q.new_ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def fp32_linear(h, weight, bias=None):
    """h @ weight^T (+ bias) in fp32, autocast off: the output heads. In bf16 a logit
    in [8, 16) is a multiple of 1/16: a token's log-prob, sampled and recomputed, could
    differ by > rollout's 0.02 (train/sample mismatch): large RL stacks keep this fp32."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        b = None if bias is None else bias.float()
        return F.linear(h.float(), weight.float(), b)


def inverse_cdf_sample(logprobs, generator=None):
    """logprobs (B, V) -> ids (B,): the first id whose CDF passes a uniform draw."""
    cdf = logprobs.exp().cumsum(-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, device=cdf.device, generator=generator) * total
    first = torch.searchsorted(cdf, u, right=True)  # right: p = 0 is never hit
    last_possible = torch.searchsorted(cdf, total)  # if rounding lets u reach total
    return torch.minimum(first, last_possible)[:, 0]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, attn_mask=None, cache=None):
        """x (B, T, C); attn_mask None or bool (B, 1, T, S); cache None or dict."""
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in (q, k, v))
        if cache is not None:  # the layer's KV, filled in place
            if "k" not in cache:  # room for a whole block
                cache["k"] = k.new_empty(B, H, self.cfg.block_size, C // H)
                cache["v"] = torch.empty_like(cache["k"])
                cache["len"] = 0
            n = cache["len"] + T
            cache["k"][:, :, n - T:n], cache["v"][:, :, n - T:n] = k, v
            cache["len"] = n
            k, v = cache["k"][:, :, :n], cache["v"][:, :, :n]
        y = attention(q, k, v, attn_mask, self.cfg.fused_attention)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln1(x), attn_mask, cache)
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))


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
        self.head_rows = min(cfg.vocab_size, -(-self.n_out // 64) * 64)  # faster matmul
        deep_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2 init; residual projections
        for name, p in self.named_parameters():
            if p.dim() == 2:
                deep = name.endswith(("proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=deep_std if deep else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self):  # without wpe (nanoGPT's convention)
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def trunk(self, idx, pad_mask=None, cache=None, pos=None, attn_mask=None):
        """Final hidden states (B, T, C) of idx (B, T); pad_mask None: no left pads."""
        if pad_mask is not None and attn_mask is None:
            pos, attn_mask = positions_and_mask(pad_mask)
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i])
        return self.ln_f(x)

    def lm_head(self, h):
        """Next-token logits (..., n_out) in fp32, the output matrix tied to wte."""
        return fp32_linear(h, self.wte.weight[:self.head_rows])[..., :self.n_out]

    def forward(self, idx, pad_mask=None):
        """Logits (B, T, n_out) fp32 for the next token at every position."""
        return self.lm_head(self.trunk(idx, pad_mask))

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, eos_id, pad_id,
                 temperature=1.0, generator=None):
        """Sample from left-padded prompts (B, P), KV-cached -> tokens (B, P + N),
        pad_id after EOS, N <= max_new_tokens; logp (B, N) fp32: log pi(token) at
        `temperature`, 0 after EOS. No top-k/p: RL needs its sampler's log-probs."""
        B, P = prompt.shape
        assert P + max_new_tokens <= self.cfg.block_size, "prompt + response > block_size"
        pad_mask = prompt != pad_id
        pos, attn = positions_and_mask(pad_mask)
        cache = [dict() for _ in self.blocks]
        h = self.trunk(prompt, cache=cache, pos=pos, attn_mask=attn)[:, -1]
        # the keys a new token sees: the prompt's real ones, every new one
        key_mask = torch.cat([pad_mask, pad_mask.new_ones(B, max_new_tokens)], 1)
        done = pad_mask.new_zeros(B)
        out_tokens, out_logp = [], []
        for step in range(max_new_tokens):
            logprobs = F.log_softmax(self.lm_head(h) / temperature, dim=-1)
            tok = inverse_cdf_sample(logprobs, generator)
            out_tokens.append(torch.where(done, pad_id, tok))
            out_logp.append(torch.where(done, 0.0, logprobs.gather(1, tok[:, None])[:, 0]))
            done = done | (tok == eos_id)
            if step == max_new_tokens - 1 or (step % 8 == 7 and bool(done.all())):
                break  # done.all() is a sync: checked every 8 steps
            next_pos = pos[:, -1:] + step + 1
            seen = key_mask[:, None, None, :P + step + 1]
            h = self.trunk(tok[:, None], cache=cache, pos=next_pos, attn_mask=seen)[:, -1]
        tokens = torch.cat([prompt, torch.stack(out_tokens, 1)], 1)
        return tokens, torch.stack(out_logp, 1)


class ScalarModel(nn.Module):
    """A copy of `gpt`'s trunk with a scalar head at every position: the reward
    model (read at EOS) and PPO's critic (read at every response position)."""
    def __init__(self, gpt, head_std=0.0):
        super().__init__()
        self.gpt = copy.deepcopy(gpt)
        self.head = nn.Linear(gpt.cfg.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if head_std:
            nn.init.normal_(self.head.weight, std=head_std)
        self.register_buffer("gain", torch.ones(()))  # gain, bias: reward.normalize
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, tokens, pad_mask=None):
        """tokens (B, T) -> (B, T) fp32 scalars."""
        h = self.gpt.trunk(tokens, pad_mask)
        score = fp32_linear(h, self.head.weight, self.head.bias)
        return score.squeeze(-1) * self.gain + self.bias


def atomic_write(path, write):
    """write(tmp_path), then rename it over `path`: a kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, model, meta=None):
    """A GPT or ScalarModel, its config and `meta` (a dict): one file, atomically."""
    gpt = model.gpt if isinstance(model, ScalarModel) else model
    state = dict(kind=type(model).__name__, config=asdict(gpt.cfg),
                 model=model.state_dict(), meta=meta or {})
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, meta); a bad file: a one-line ValueError naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        gpt = GPT(GPTConfig(**state["config"]))
        model = ScalarModel(gpt) if state["kind"] == "ScalarModel" else gpt
        model.load_state_dict(state["model"])
    except Exception as e:  # missing, corrupt, or from another config
        first = str(e).splitlines()[0][:200] if str(e) else ""
        why = f"{type(e).__name__}: {first}"
        raise ValueError(f"cannot load checkpoint {path}: {why}") from None
    return model.to(device).eval(), state["meta"]


def adamw(params, device, lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019), fused where PyTorch can."""
    fused = torch.device(device).type in ("cpu", "cuda")
    kw = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(params, **kw, fused=fused)


def pick_device(name="auto"):
    """"auto": CUDA, else MPS, else the CPU; ValueError if the named one is absent."""
    mps = torch.backends.mps.is_available()
    has = {"cuda": torch.cuda.is_available(), "mps": mps, "cpu": True}
    device = next(d for d in has if has[d]) if name == "auto" else name
    if not has.get(device):
        raise ValueError(f"--device {device}: no {device.upper()} device is available")
    return device


def pick_dtype(name, device):
    """"auto": bf16 where native (Ampere+ GPU, AMX/AVX512-BF16 CPU), else fp32."""
    if name != "auto":
        return name
    if device == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp32"
    info = "/proc/cpuinfo"
    flags = open(info).read().split() if os.path.exists(info) else []
    native = {"amx_bf16", "avx512_bf16"} & set(flags)
    return "bf16" if device == "cpu" and native else "fp32"


def autocast(device, dtype, sampling=False):
    """bf16 autocast when dtype is "bf16" (not the output heads; log-softmax,
    losses and KL stay fp32). On a CPU sampling stays fp32: thin decode matmuls
    gain little from bf16 (docs/performance.md), and fp32 samples are exact."""
    device_type = torch.device(device).type
    if dtype != "bf16" or (sampling and device_type == "cpu"):
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
