"""sample.py --kl: each answer token printed with log pi - log pi_ref, the total being the k1 estimate of
the answer's KL (its log-ratios summed over the response mask, EOS included, padding and prompt not)."""
import re

import torch

import sample
import tokenizer as tok
from helpers import tiny_gpt
from reference import response_mask, token_logprobs

TEXTS = ["the film was good.", "i loved the plot!", "the acting was bad.", "it was a mess."] * 20


def test_token_kl_lines_sum_to_the_answers_k1():
    enc = tok.train_tokenizer(TEXTS, 300)
    policy, ref, pad = tiny_gpt(enc, 0), tiny_gpt(enc, 1), tok.pad_id(enc)
    prompt = tok.left_pad([tok.encode(enc, p) for p in ("the film", "i loved the")], pad)
    torch.manual_seed(0)
    tokens, _ = policy.generate(prompt, 6, tok.eos_id(enc), pad)
    P = prompt.shape[1]
    lines = sample.token_kl_lines(policy, ref, enc, tokens, P)
    mask = response_mask(tokens, P, pad)
    k1 = ((token_logprobs(policy, tokens, pad) - token_logprobs(ref, tokens, pad)) * mask).sum(1)
    for line, total, n in zip(lines, k1, mask.sum(1)):
        pieces = re.findall(r"\[([+-]\d+\.\d+)\]", line)
        assert len(pieces) == int(n)  # one figure per answer token, none for the prompt or padding
        assert float(line.split("=")[-1].split()[0]) == round(total.item(), 2)
