"""Batched classifier-free guidance where it pays: the conditional and unconditional passes as one call for small
calls (docs/method.md §3, §11)."""

from __future__ import annotations

from ..guidance import GuidedEps


class AdaptiveCFG:
    """Classifier-free guidance with the conditional and unconditional passes as one call of 2a when the
    call has a <= ``threshold`` samples, as separate passes otherwise (``GuidedEps`` either way: the same
    values up to kernel rounding). The training default uses threshold B/2: batching gains nothing once the
    GPU is full (docs/method.md §11: batch 16 at 1024 px), but the per-sample Direct CM loop's active set shrinks to 1.
    threshold 0 = always separate (the reference), B = always batched. Counts the calls of each kind."""

    def __init__(self, eps_fn, w: float, threshold: int):
        self.separate = GuidedEps(eps_fn, w, batched=False)
        self.batched = GuidedEps(eps_fn, w, batched=True)
        self.threshold = threshold
        self.batched_calls = self.separate_calls = 0

    def __call__(self, x, t, cond):
        if x.shape[0] <= self.threshold:
            self.batched_calls += 1
            return self.batched(x, t, cond)
        self.separate_calls += 1
        return self.separate(x, t, cond)
