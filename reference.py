"""The reference model (a frozen copy of the policy as RL began) and the one
function that turns any model and batch into per-token log-probs. The KL penalty
is measured against it token by token, so it never changes (`freeze`) and its
log-probs are computed exactly like the policy's (`token_logprobs`, the sampling
temperature, fp32): KL is 0 at the first step of RL.
"""
import copy

import torch
import torch.nn.functional as F


def freeze(model):
    """A frozen deep copy of `model`: eval mode, requires_grad False."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def trainable(model):
    """A deep copy of `model` to train: requires_grad True (eval mode: no dropout)."""
    policy = copy.deepcopy(model)
    policy.requires_grad_(True)
    return policy


def token_logprobs(model, tokens, pad_id=None, temperature=1.0, return_logits=False):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) for all t, in one forward pass.

    tokens (B, T). pad_id: give it when prompts are left-padded (positions and
    attention then skip the padding); None when rows are only right-padded
    (causal attention never looks right). Returns (B, T-1) fp32 at the sampling
    temperature, meaningless where the target is padding (`response_mask`);
    return_logits: also the scaled logits (B, T-1, V), for exact KL."""
    pad_mask = None if pad_id is None else tokens != pad_id
    logits = model(tokens, pad_mask)[:, :-1].float() / temperature
    targets = tokens[:, 1:]
    # PAD lies beyond the outputs; masked later
    targets = torch.where(targets < logits.shape[-1], targets, 0)
    # cross-entropy fuses log-softmax and gather: no (B, T, V) log-probs
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    logp = -nll.view_as(targets)
    return (logp, logits) if return_logits else logp


def response_mask(tokens, prompt_len, pad_id):
    """(B, T-1) float mask aligned with `token_logprobs`: 1 where the target is
    a response token (after the prompt_len prompt columns, not padding; EOS
    included: the policy chose to stop)."""
    targets = tokens[:, 1:]
    columns = torch.arange(targets.shape[1], device=tokens.device)
    return ((columns >= prompt_len - 1) & (targets != pad_id)).float()
