"""Small builders shared by the test files (pytest puts tests/ on the import path)."""
import torch

import tokenizer as tok
from model import GPT, GPTConfig


class EOSProneGPT(GPT):
    """A GPT whose EOS logit is raised by a constant (a buffer, so copies keep it): its answers
    end after a few tokens, or with a small raise some run out of room without an EOS."""

    def __init__(self, cfg, eos_id, eos_bias):
        super().__init__(cfg)
        bias = torch.zeros(self.n_out)
        bias[eos_id] = eos_bias
        self.register_buffer("eos_bias", bias)

    def lm_head(self, h):
        return super().lm_head(h) + self.eos_bias


def tiny_gpt(enc, seed=0, block_size=32, n_layer=2, eos_bias=None):
    """A randomly initialised GPT over `enc`'s vocabulary (PAD outside the output range), in
    eval mode, the same weights for the same seed; eos_bias: an EOSProneGPT."""
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=tok.padded_vocab_size(enc), n_layer=n_layer,
                    n_head=2, n_embd=32, n_out=tok.pad_id(enc))
    return (GPT(cfg) if eos_bias is None else EOSProneGPT(cfg, tok.eos_id(enc), eos_bias)).eval()


class TabularPolicy(torch.nn.Module):
    """A one-step "language model": its logits at every position are one parameter vector theta
    (V,). A sequence [prompt_token, arm] is one pull of the bandit; the last column's logits are
    never read (token_logprobs drops them)."""

    def __init__(self, logits):
        super().__init__()
        self.theta = torch.nn.Parameter(logits.clone())

    def forward(self, tokens, pad_mask=None):
        return self.theta.expand(*tokens.shape, -1)
