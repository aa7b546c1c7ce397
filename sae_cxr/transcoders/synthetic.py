"""Synthetic (x, h) pairs with the structure of the phantom demo, for tests and benchmarks.

x imitates an image embedding: a shared mean, a sparse mixture of a few (`active` on average) of
`n_concepts` concept directions, plus isotropic noise, L2-normalised like CLIP embeddings.
magnitude="presence" (default): a present concept has strength 1 +- 0.3, like a planted phantom
finding; "exponential": heavy-tailed continuous strengths, a harder, less clustered world.
head="dense" (default): W1 has i.i.d. Gaussian rows, so every hidden unit mixes all concepts;
"concept": each unit is tuned to one or two concepts plus a small dense part, as the units of a
trained head tend to be. h = relu(W1 x + b1) is the hidden layer of a random-ish classifier head with five
findings (logits = W2 h + b2), and labels are drawn from the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticPairs:
    x: Tensor
    """[N, d_in] classifier inputs."""
    h: Tensor
    """[N, d_out] hidden layer relu(W1 x + b1)."""
    W1: Tensor
    b1: Tensor
    W2: Tensor
    """[5, d_out] the head's output layer."""
    b2: Tensor
    labels: Tensor
    """[N, 5] in {0, 1}, NaN for about 5% (unlabelled)."""


def synthetic_pairs(n: int, d_in: int = 256, d_out: int = 256, n_concepts: int = 40, active: float = 4.0,
                    noise: float = 0.03, magnitude: str = "presence", head: str = "dense",
                    seed: int = 0) -> SyntheticPairs:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_concepts, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    mean = torch.randn(d_in, generator=g)
    mean = 1.5 * mean / mean.norm()
    p = active / n_concepts
    on = torch.rand(n, n_concepts, generator=g) < p
    if magnitude == "presence":  # a planted concept is there or not, with some variation in strength
        mag = (1.0 + 0.3 * torch.randn(n, n_concepts, generator=g)).clamp(min=0.2)
    elif magnitude == "exponential":  # heavy-tailed continuous strengths (harder)
        mag = -torch.log(torch.rand(n, n_concepts, generator=g).clamp(min=1e-9))
    else:
        raise ValueError(f"magnitude must be 'presence' or 'exponential', got {magnitude!r}")
    x = mean + (on * mag) @ D + noise * torch.randn(n, d_in, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    if head == "dense":  # every hidden unit reads a random direction of x
        W1 = torch.randn(d_out, d_in, generator=g) * (3.0 / d_in ** 0.5)
        b1 = -0.5 * torch.rand(d_out, generator=g) * 0.2
    elif head == "concept":  # units tuned to 1-2 concepts (as a trained head's units tend to be), plus a dense part
        A = torch.zeros(d_out, n_concepts)
        for u in range(d_out):
            c = torch.randperm(n_concepts, generator=g)[:2]
            A[u, c] = torch.rand(2, generator=g) * 1.5 + 0.5
            if float(torch.rand(1, generator=g)) < 0.5:
                A[u, c[1]] = -A[u, c[1]]
        W1 = 3.0 * (A @ D) + torch.randn(d_out, d_in, generator=g) * (1.0 / d_in ** 0.5)
        b1 = -0.3 - 0.2 * torch.rand(d_out, generator=g)
    else:
        raise ValueError(f"head must be 'dense' or 'concept', got {head!r}")
    h = torch.relu(x @ W1.t() + b1)
    W2 = torch.randn(5, d_out, generator=g) / d_out ** 0.5 * 3
    logits0 = h @ W2.t()
    b2 = -logits0.mean(0)
    logits = logits0 + b2
    labels = (torch.rand(n, 5, generator=g) < torch.sigmoid(2 * logits)).float()
    labels[torch.rand(n, 5, generator=g) < 0.05] = float("nan")
    return SyntheticPairs(x, h, W1, b1, W2, b2, labels)
