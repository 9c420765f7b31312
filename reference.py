"""
The reference model: a frozen copy of the policy as it was when RL began.

The KL penalty measures how far the policy has moved from this model, token by
token, so two things must be exactly right:
  * the reference never changes (`freeze`: a deep copy, eval mode, no gradients);
  * its log-probs are computed the same way as the policy's (`token_logprobs`:
    same temperature as sampling, fp32 log-softmax), or KL would not be 0 at the
    first step of RL.

DPO only ever needs the reference's log-probs of a *fixed* dataset, so
`precompute_logprobs` computes them once and the reference can then leave memory.
Memory trade-off in numbers (fp32 weights; AdamW keeps two more copies of the
policy's): the default preset's GPT (4 x 128, vocab 512) is 0.86 M parameters,
3.4 MB; the `gpu` preset's (6 x 384, vocab 512) is 10.8 M, 43 MB. Keeping the
reference costs one more weight copy (+25% over policy weights and Adam state)
and a forward pass per batch; the precomputed table costs 8 bytes per pair
(two fp32 sums), 16 KB for 2,000 pairs.
"""
import copy

import torch
import torch.nn.functional as F


def freeze(model):
    """A frozen deep copy of `model`: eval mode, requires_grad False everywhere."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def gather_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature)[targets] in fp32.
    logits (B, T, V), targets (B, T) -> (B, T). Uses cross-entropy, which fuses the
    log-softmax and the gather, so no (B, T, V) log-prob tensor is kept around."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    B, T, V = logits.shape
    # PAD targets lie outside the model's output range; they are masked out by the
    # caller, so any in-range id may stand in for them here.
    targets = torch.where(targets < V, targets, torch.zeros_like(targets))
    nll = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), reduction="none")
    return -nll.view(B, T)


def token_logprobs(model, tokens, pad_id=None, temperature=1.0, return_logits=False):
    """Log-probs of each next token in one forward pass.

    tokens: (B, T) ids, prompts left-padded and responses right-padded with pad_id.
    Returns (B, T-1): entry t is log pi(tokens[:, t+1] | tokens[:, :t+1]) at the given
    temperature (the one used for sampling). Entries whose target is padding are
    meaningless; multiply by a mask (see `response_mask`). With return_logits, also
    the (B, T-1, V) logits that produced them (for the exact KL).
    """
    pad_mask = None if pad_id is None else tokens != pad_id
    if pad_mask is not None and bool(pad_mask.all()):
        pad_mask = None  # nothing to hide: take the plain causal path
    logits = model(tokens, pad_mask)[:, :-1]
    logp = gather_logprobs(logits, tokens[:, 1:], temperature)
    return (logp, logits) if return_logits else logp


def response_mask(tokens, prompt_len, pad_id):
    """(B, T-1) float mask aligned with `token_logprobs`: 1 where the *target* token
    is part of the response (after the prompt's P columns, not padding), else 0.
    The EOS token is part of the response: the policy chose to stop."""
    targets = tokens[:, 1:]
    is_response = torch.zeros_like(targets, dtype=torch.bool)
    is_response[:, prompt_len - 1:] = True
    return (is_response & (targets != pad_id)).float()


@torch.inference_mode()
def precompute_logprobs(model, batches, pad_id, temperature=1.0):
    """Summed response log-probs of a fixed dataset under `model`, computed once.

    batches: iterable of (tokens (B, T), mask (B, T-1)) pairs. Returns a 1-D fp32
    tensor of per-sequence sums, in order. This is all DPO needs of the reference.
    """
    sums = []
    for tokens, mask in batches:
        logp = token_logprobs(model, tokens, pad_id, temperature)
        sums.append((logp * mask).sum(1).float().cpu())
    return torch.cat(sums)
