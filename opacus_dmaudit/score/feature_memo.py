"""Backbone features computed once per distinct image, within one audit (see ``LPIPS``).

An audit asks LPIPS about the same images several times (the truth and each stage in the
metrics, the stages and the whole batch in the identification criterion, the clean readouts in
the prior-fit check). :class:`FeatureMemo` keeps each image's features under a digest of its
pixels, so a second request for the same pixels costs a dictionary lookup. Images are looked up
one by one, so the batch a request arrives in does not matter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

__all__ = ["FeatureMemo"]


def _digest(image: torch.Tensor) -> bytes:
    """A key for one image: its shape and a digest of its float32 pixels."""
    pixels = image.detach().contiguous().cpu().numpy()
    return repr(tuple(image.shape)).encode() + hashlib.blake2b(pixels, digest_size=16).digest()


class FeatureMemo:
    """Per-image feature lists, kept while they fit in ``budget`` bytes.

    Args:
        budget: most bytes of features kept; images beyond it are computed each time.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._kept: dict[bytes, list[torch.Tensor]] = {}

    def features(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Features of ``images`` (per layer, batched), computing only the unseen images."""
        if images.shape[0] == 0:
            return compute(images)
        keys = [_digest(image) for image in images]
        fresh: dict[bytes, int] = {}  # unseen key -> its first position in this batch
        for i, key in enumerate(keys):
            if key not in self._kept and key not in fresh:
                fresh[key] = i
        computed: dict[bytes, list[torch.Tensor]] = {}
        if fresh:
            feats = compute(images[list(fresh.values())])
            for j, key in enumerate(fresh):
                computed[key] = [layer[j : j + 1] for layer in feats]
                self._keep(key, computed[key])
        rows = [self._kept.get(key) or computed[key] for key in keys]
        return [torch.cat([row[layer] for row in rows]) for layer in range(len(rows[0]))]

    def _keep(self, key: bytes, feats: list[torch.Tensor]) -> None:
        size = sum(f.numel() * f.element_size() for f in feats)
        if self.used + size <= self.budget:
            self._kept[key] = [f.clone() for f in feats]  # not a view of the whole batch
            self.used += size
