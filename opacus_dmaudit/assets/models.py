"""The small image classifier the demo, the examples' tests and the benchmarks train.

One definition (Opacus-compatible: GroupNorm, never BatchNorm; no in-place ops), so every place
that says "the demo's CNN" trains the same network.
"""

from __future__ import annotations

from torch import nn

__all__ = ["small_cnn"]


def small_cnn(
    channels: int = 1,
    size: int = 28,
    num_classes: int = 10,
    *,
    width: int = 16,
    groupnorm: bool = True,
) -> nn.Sequential:
    """Two strided 5×5 convolutions (``width``, ``2·width`` channels) and a linear head.

    Args:
        channels, size: input images ``(channels, size, size)``.
        num_classes: outputs.
        width: channels of the first convolution (the demo uses 16, the benchmarks 8).
        groupnorm: a GroupNorm (4 groups) after each convolution.

    Example:
        >>> model = small_cnn(1, 28)  # the demo's digit CNN
    """
    flat = 2 * width * (((size - 4) // 2 - 4) // 2) ** 2
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 5, 2)]
    if groupnorm:
        layers.append(nn.GroupNorm(4, width))
    layers += [nn.ReLU(), nn.Conv2d(width, 2 * width, 5, 2)]
    if groupnorm:
        layers.append(nn.GroupNorm(4, 2 * width))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(flat, num_classes)]
    return nn.Sequential(*layers)
