"""Small data sets that need no download: the article's two rings, a synthetic table with a
categorical column, and scikit-learn's digits.

Each carries its `name` ("rings", "tabular", "digits"), which a tracked fit gives the dataset
in its MLflow run, also through a `random_split` of it.
"""

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
    return _named(TensorDataset(x, y), "rings")


TABULAR_FEATURES = 4
"""Numeric features of `tabular`."""
TABULAR_CATEGORIES = 8
"""Categories of `tabular`'s categorical column, 0 to 7."""


def tabular(n: int = 4000, seed: int = 0) -> TensorDataset:
    """A synthetic table: 4 numeric features and a categorical column decide a binary label.

    The label's log-odds are a fixed linear function of the numeric features plus an effect of
    the category (from -2 to 2), and noise; neither part alone predicts it well, so a net that
    embeds the category beats one that only sees the numbers (above 0.9 accuracy against 0.77).

    Args:
        n: Number of rows. Defaults to 4000.
        seed: Seed of the generator. Defaults to 0.

    Returns:
        `x_num` of shape `(n, 4)` float32, `x_cat` of shape `(n,)` int64 in `[0, 8)` and `y`
        of shape `(n, 1)` float32 (0.0 or 1.0).

    Example:
        >>> x_num, x_cat, y = tabular(10).tensors
        >>> tuple(x_num.shape), x_cat.dtype, tuple(y.shape)
        ((10, 4), torch.int64, (10, 1))
    """
    generator = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1.5, -1.0, 0.5, 0.0])  # the last feature is noise
    effects = torch.linspace(-2.0, 2.0, TABULAR_CATEGORIES)[torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])]
    x_num = torch.randn(n, TABULAR_FEATURES, generator=generator)
    x_cat = torch.randint(0, TABULAR_CATEGORIES, (n,), generator=generator)
    logits = x_num @ weights + effects[x_cat] + 0.5 * torch.randn(n, generator=generator)
    y = (logits > 0).float().unsqueeze(1)
    return _named(TensorDataset(x_num, x_cat, y), "tabular")


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
    return _named(TensorDataset(x, torch.tensor(labels, dtype=torch.int64)), "digits")


def _named(dataset: TensorDataset, name: str) -> TensorDataset:
    """`dataset` with its `name`, as MLflow runs show it (lkflow.tracking.artifacts)."""
    dataset.name = name  # type: ignore[attr-defined]  # an attribute of this instance
    return dataset
