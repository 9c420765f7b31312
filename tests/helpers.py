"""Small builders shared by the test files (pytest puts tests/ on the import path)."""
import torch

import tokenizer as tok
from model import GPT, GPTConfig


def tiny_gpt(enc, seed=0, block_size=32, n_layer=2):
    """A randomly initialised GPT over `enc`'s vocabulary (PAD outside the output range), in
    eval mode, the same weights for the same seed."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=tok.padded_vocab_size(enc), n_layer=n_layer,
                         n_head=2, n_embd=32, n_out=tok.pad_id(enc))).eval()
