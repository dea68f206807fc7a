"""Small data sets that need no download: the article's two rings and scikit-learn's digits."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset


def rings(n: int = 4000, seed: int = 0) -> TensorDataset:
    """The article's two rings: points at radius 5 are positive (1.0), at radius 8 negative (0.0).

    Args:
        n: Number of points, half of each class. Defaults to 4000, the article's size.
        seed: Seed of the generator. Defaults to 0.

    Returns:
        `x` of shape `(n, 2)` and `y` of shape `(n, 1)`, both float32.

    Example:
        >>> x, y = rings(10).tensors
        >>> tuple(x.shape), tuple(y.shape), float(y.sum())
        ((10, 2), (10, 1), 5.0)
    """
    generator = torch.Generator().manual_seed(seed)
    positive, negative = n // 2, n - n // 2
    radius = torch.cat(
        [
            5.0 + torch.randn(positive, 1, generator=generator),
            8.0 + torch.randn(negative, 1, generator=generator),
        ]
    )
    theta = 2 * math.pi * torch.rand(n, 1, generator=generator)
    x = torch.cat([radius * torch.cos(theta), radius * torch.sin(theta)], dim=1)
    y = torch.cat([torch.ones(positive, 1), torch.zeros(negative, 1)])
    return TensorDataset(x, y)


def digits() -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), scaled to [0, 1].

    Returns:
        `x` of shape `(1797, 1, 8, 8)` float32 and `y` of shape `(1797,)` int64.

    Example:
        >>> x, y = digits().tensors  # doctest: +SKIP
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return TensorDataset(x, torch.tensor(labels, dtype=torch.int64))
