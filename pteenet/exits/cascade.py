"""What a cascaded head reads of the previous exit (``BranchConfig.cascade_input``), in one place
for the trainable branch and its folded inference form.

- ``zscore`` (the default since schema 2 of ``BranchConfig``): the previous head's logits
  standardised per sample (mean 0, standard deviation 1 over the classes). Its scale does not grow
  with the number of classes nor along the exits: each head re-standardises, and a z-score is at
  most sqrt(K - 1) in size. At initialisation the K x K block of the head's weights then adds
  logits of about unit size, whatever K.
- ``logprob``: the previous head's log-probabilities, what schema-1 checkpoints were trained with
  (read back unchanged). With 1,000 classes they reach -7 (uniform) to -100s (confident) on every
  class, dominate the head's input and compound along the exits: training diverged.
"""
from __future__ import annotations

import torch

CASCADE_INPUTS = ("zscore", "logprob")
EPS = 1e-5  # a constant row (exit 0's zeros, a head that answers the same for every class) reads as zeros


def cascade_features(prev: torch.Tensor, form: str) -> torch.Tensor:
    """The well-scaled form ``form`` of the previous head's logits [B, K] (float32 inside)."""
    p = prev.detach().float()
    if form == "logprob":
        out = torch.log_softmax(p, 1)
    elif form == "zscore":
        centred = p - p.mean(1, keepdim=True)
        out = centred / (centred.square().mean(1, keepdim=True).sqrt() + EPS)
    else:
        raise ValueError(f"unknown cascade input {form!r}")
    return out.to(prev.dtype)
