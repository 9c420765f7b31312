"""
The GPT: a small decoder-only transformer in the style of nanoGPT / GPT-2 (pre-LayerNorm blocks, causal
self-attention, a GELU MLP, learned positions, an output head tied to the token embedding, Press & Wolf
2017), and what every stage does with one. RLHF batches prompts left-padded with PAD: `pad_mask` (B, T), True
on real tokens, counts each row's positions from its first real token and hides the padding from attention.
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
    block_size: int = 64      # longest sequence (prompt + response) the model sees
    vocab_size: int = 1024    # embedding rows: the tokenizer's ids, padded to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0      # keep 0 for RL: sampling and training must see the same model
    bias: bool = True
    n_out: int = 0            # outputs [0, n_out) (0: all): PAD (last id) and padding rows are never sampled
    fused_attention: bool | None = None  # None: PyTorch's fused kernel on GPUs, written out on CPUs


def positions_and_mask(pad_mask):
    """pad_mask (B, T) bool -> positions (B, T) and a bool attention mask (B, 1, T, T): causal, padding
    hidden, each query sees at least itself (an all-PAD row would otherwise softmax over nothing)."""
    T = pad_mask.shape[1]
    pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=pad_mask.device).tril()
    return pos, (causal & pad_mask[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=pad_mask.device)


def attention(q, k, v, mask=None, fused=None):
    """softmax(q k^T / sqrt(d)) v over the keys each query may see (Vaswani et al. 2017, eq. 1): q (B, H, T,
    d), k, v (B, H, S, d) -> (B, H, T, d); mask None (causal, T == S) or bool, broadcastable to (B, H, T, S),
    True where a query may look. fused=True: PyTorch's kernel, never building the (T, S) scores (best on
    GPUs); False: written out (faster on CPUs at these sizes, docs/performance.md); None: by device."""
    if fused or (fused is None and q.device.type != "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, attn_mask=None, cache=None):
        """x (B, T, C); attn_mask None or bool (B, 1, T, S); cache None or the layer's KV, filled in place."""
        (B, T, C), H = x.shape, self.cfg.n_head
        q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in self.qkv(x).split(C, dim=2))
        if cache is not None:
            if "k" not in cache:
                cache["k"] = k.new_empty(B, H, self.cfg.block_size, C // H)
                cache["v"], cache["len"] = torch.empty_like(cache["k"]), 0
            n = cache["len"] + T
            cache["k"][:, :, n - T:n], cache["v"][:, :, n - T:n] = k, v
            k, v, cache["len"] = cache["k"][:, :, :n], cache["v"][:, :, :n], n
        y = attention(q, k, v, attn_mask, self.cfg.fused_attention)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
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
        self.head_rows = min(cfg.vocab_size, -(-self.n_out // 64) * 64)  # a matmul width of 64k
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer)
                deep = name.endswith(("proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer) if deep else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self):  # the position embedding left out (nanoGPT's convention)
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def trunk(self, idx, pad_mask=None, cache=None, pos=None, attn_mask=None):
        """Final hidden states (B, T, C) of idx (B, T); pad_mask None when no row is left-padded."""
        if pad_mask is not None and attn_mask is None:
            pos, attn_mask = positions_and_mask(pad_mask)
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i])
        return self.ln_f(x)

    def lm_head(self, h):
        """Next-token logits (..., n_out), the output matrix tied to the token embedding."""
        return F.linear(h, self.wte.weight[:self.head_rows])[..., :self.n_out]

    def forward(self, idx, pad_mask=None):
        """Logits (B, T, n_out) for the next token at every position."""
        return self.lm_head(self.trunk(idx, pad_mask))

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, eos_id, pad_id, temperature=1.0, generator=None):
        """Sample from left-padded prompts (B, P) with a KV cache -> tokens (B, P + N): prompt, response, and
        pad_id after a row's EOS; logp (B, N) fp32: log pi(token) at the temperature it was drawn at, 0 after
        EOS; N <= max_new_tokens. Plain temperature sampling, no top-k or top-p: RL needs the log-probs of the
        very distribution it samples from. generator: a torch.Generator for the uniforms."""
        B, P = prompt.shape
        assert P + max_new_tokens <= self.cfg.block_size, "prompt + response longer than block_size"
        pad_mask = prompt != pad_id
        pos, attn = positions_and_mask(pad_mask)
        cache = [dict() for _ in self.blocks]
        h = self.trunk(prompt, cache=cache, pos=pos, attn_mask=attn)[:, -1]
        key_mask = torch.cat([pad_mask, pad_mask.new_ones(B, max_new_tokens)], 1)  # prompt's real keys + new
        done, out_tokens, out_logp = pad_mask.new_zeros(B), [], []
        for step in range(max_new_tokens):
            logprobs = F.log_softmax(self.lm_head(h).float() / temperature, dim=-1)
            # inverse-CDF sampling: the first id whose CDF passes a uniform draw (right=True: an id of
            # probability 0 is never hit); if rounding lets u reach the total, the last id with p > 0
            cdf = logprobs.exp().cumsum(-1)
            total = cdf[:, -1:].contiguous()
            u = torch.rand(B, 1, device=cdf.device, generator=generator) * total
            tok = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total))[:, 0]
            out_tokens.append(torch.where(done, pad_id, tok))
            out_logp.append(torch.where(done, 0.0, logprobs.gather(1, tok[:, None])[:, 0]))
            done = done | (tok == eos_id)
            if step == max_new_tokens - 1 or (step % 8 == 7 and bool(done.all())):  # a sync every 8 steps
                break
            h = self.trunk(tok[:, None], cache=cache, pos=pos[:, -1:] + step + 1,
                           attn_mask=key_mask[:, None, None, :P + step + 1])[:, -1]
        return torch.cat([prompt, torch.stack(out_tokens, 1)], 1), torch.stack(out_logp, 1)


class ScalarModel(nn.Module):
    """A copy of `gpt`'s trunk with a scalar head at every position: the reward model (read at EOS) and
    PPO's critic (read at every response position). Buffers `gain`, `bias` normalise (reward.normalize)."""
    def __init__(self, gpt, head_std=0.0):
        super().__init__()
        self.gpt = copy.deepcopy(gpt)
        self.head = nn.Linear(gpt.cfg.n_embd, 1)
        nn.init.normal_(self.head.weight, std=head_std) if head_std else nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, tokens, pad_mask=None):
        """tokens (B, T) -> (B, T) fp32 scalars."""
        return self.head(self.gpt.trunk(tokens, pad_mask)).squeeze(-1).float() * self.gain + self.bias


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: a kill mid-write never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, model, meta=None):
    """A GPT or ScalarModel, its config and `meta` (a dict), in one file, written atomically."""
    gpt = model.gpt if isinstance(model, ScalarModel) else model
    state = dict(kind=type(model).__name__, config=asdict(gpt.cfg), model=model.state_dict(), meta=meta or {})
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, meta). ValueError with one line naming the file if it is bad."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        gpt = GPT(GPTConfig(**state["config"]))
        model = ScalarModel(gpt) if state["kind"] == "ScalarModel" else gpt
        model.load_state_dict(state["model"])
    except Exception as e:  # missing, corrupt, or from another config
        raise ValueError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return model.to(device).eval(), state["meta"]


def adamw(params, device, lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019), as one fused kernel where PyTorch has one."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)


def pick_device(name="auto"):
    """"auto": CUDA, else MPS, else the CPU. ValueError if the named device is not there."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = next(d for d in has if has[d]) if name == "auto" else name
    if not has.get(device):
        raise ValueError(f"--device {device}: no {device.upper()} device is available")
    return device


def pick_dtype(name, device):
    """"auto": bf16 where hardware multiplies it natively (Ampere+ GPU, AMX/AVX512-BF16 CPU), else fp32."""
    if name != "auto":
        return name
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return "bf16" if device == "cpu" and {"amx_bf16", "avx512_bf16"} & set(flags) else "fp32"


def autocast(device, dtype, sampling=False):
    """bf16 autocast when dtype is "bf16" (matmuls in bf16; log-softmax, losses and KL stay fp32).
    Sampling on a CPU stays fp32: its thin decode matmuls gain little or nothing from bf16 (measured in
    docs/performance.md: a few percent slower at 2 threads, faster at 1), and fp32 samples are exact."""
    if dtype != "bf16" or (sampling and torch.device(device).type == "cpu"):
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
