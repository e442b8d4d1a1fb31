"""The diffusion-model prior: Algorithm 1 of the paper (DDS-style denoising) on diffusers models.

A readout ``x̂ = x + s·n`` (pixels in [0, 1], Gaussian noise of std ``s``) is mapped to the model's
[-1, 1] range (``y = 2x̂ − 1``, so the noise std becomes ``2s``), matched to the timestep ``t*`` whose
noise-to-signal ratio ``σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)`` is closest, and rescaled to
``x_{t*} = sqrt(ᾱ_{t*})·y`` — a sample of the forward process at ``t*`` without fresh noise. The
reverse process from ``t*`` then gives the reconstruction:

* ``"ddim-every-step"``: deterministic DDIM (η = 0) at every timestep ``t*, t*−1, …, 1`` (the
  last model call's x̂0 is the result): the paper's loop (Algorithm 1, line 6);
* ``"ddim"``: the same update on a coarser grid of at most ``steps`` timesteps from ``t*``;
* ``"ancestral"``: DDPM ancestral sampling at every timestep (fresh noise at each step);
* ``"posterior-mean"``: the one-shot estimate ``E[x_0 | x_{t*}]`` (best MSE, blurry).

Each image may have its own noise level; the samplers run the batch with per-image timesteps.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sampler import SAMPLERS, SamplerSettings, sampler_name

logger = logging.getLogger(__name__)

__all__ = [
    "DiffusionPrior",
    "SAMPLERS",
    "sampler_name",
    "check_prior_name",
    "EMBEDDED_PRIORS",
    "sigma_schedule",
    "match_timesteps",
    "native_bf16",
]


def check_prior_name(name_or_path: str | os.PathLike) -> None:
    """Fail at once on a prior name that can only be a local path, when that path is missing.

    A hub id is ``owner/name``; anything starting with ``.``, ``/`` or ``~``, holding more than one
    ``/`` or a backslash, or whose first folder exists here, is a path, and a missing one raises
    ``FileNotFoundError`` instead of minutes of Hub retries.
    """
    name = str(name_or_path)
    if name.startswith("embedded:"):
        _embedded_path(name.split(":", 1)[1])
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    looks_local = (
        isinstance(name_or_path, os.PathLike)
        or name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or "\\" in name
        or Path(name.split("/", 1)[0]).is_dir()
    )
    if looks_local:
        raise FileNotFoundError(
            f"no such directory: {name!r} (a prior is a local diffusers directory, a hub id "
            "like 'google/ddpm-cifar10-32', or one of "
            + ", ".join(f"embedded:{n}" for n in EMBEDDED_PRIORS)
            + ")"
        )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resizing, antialiased when shrinking (the one resampler of ``resize=True``)."""
    shrink = size[0] < x.shape[2] or size[1] < x.shape[3]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@functools.lru_cache(maxsize=64)
def _resize_gain(n_in: int, n_out: int) -> float:
    """Root-mean-square row norm of the 1-D operator of :func:`_resize` from ``n_in`` to ``n_out``
    pixels: what resizing does to the std of independent per-pixel noise along one axis."""
    if n_in == n_out:
        return 1.0
    # one unit pixel per image, along H; W is 2 wide and kept (a 1-wide W takes another path)
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).expand(-1, -1, -1, 2)
    rows = _resize(basis.contiguous(), (n_out, 2))[:, 0, :, 0]  # rows[k, i] = R[i, k]
    return float(rows.pow(2).sum(dim=0).mean().sqrt())


#: Priors shipped inside the package (``"embedded:<name>"``), trained by ``dmaudit train-prior``.
EMBEDDED_PRIORS = ("mnist", "natural")


def sigma_schedule(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise-to-signal ratio ``σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)`` of each timestep."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def match_timesteps(sigma_t: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
    """``t* = argmin_t |σ_t − s|`` for each noise std ``s`` (in the model's units)."""
    diff = (sigma_t[None, :] - noise_std.double()[:, None]).abs()
    return diff.argmin(dim=1)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _embedded_path(name: str) -> Path:
    if name not in EMBEDDED_PRIORS:
        raise ValueError(
            f"unknown embedded prior {name!r}; available: "
            + ", ".join(f"embedded:{n}" for n in EMBEDDED_PRIORS)
        )
    ref = importlib.resources.files("opacus_dmaudit") / "assets" / "priors" / name
    path = Path(str(ref))
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded prior {name!r} is missing from the installed package ({path}); "
            "reinstall opacus-dmaudit, or train one with `dmaudit train-prior`"
        )
    return path


# -- loading ---------------------------------------------------------------------------------------
def _prior_path(name: str) -> str:
    """Where ``name`` points: an embedded prior's folder, an existing local path, or a hub id."""
    if name.startswith("embedded:"):
        return str(_embedded_path(name.split(":", 1)[1]))
    expanded = Path(name).expanduser()
    return str(expanded) if expanded.exists() else name


def _unet_kwargs(hub_kwargs: dict) -> dict:
    kwargs = dict(hub_kwargs)
    if importlib.util.find_spec("accelerate") is None:
        kwargs.setdefault("low_cpu_mem_usage", False)  # diffusers would warn otherwise
    return kwargs


def _load_local(path: str, hub_kwargs: dict) -> tuple:
    """``(unet, scheduler config)`` of a local folder: the ``DDPMPipeline`` or the flat layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    local = Path(path)
    unet_sub = "unet" if (local / "unet" / "config.json").is_file() else None
    if unet_sub is None and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{local} holds no diffusers UNet (expected unet/config.json or config.json)"
        )
    sched_sub = "scheduler" if (local / "scheduler" / "scheduler_config.json").is_file() else None
    unet = UNet2DModel.from_pretrained(path, subfolder=unet_sub, **_unet_kwargs(hub_kwargs))
    return unet, DDPMScheduler.load_config(path, subfolder=sched_sub, **hub_kwargs)


def _load_hub(name: str, hub_kwargs: dict) -> tuple:
    """``(unet, scheduler config)`` of a hub id: from the local cache first; otherwise the Hub
    is asked once whether the id exists (a typo of a local path fails in a second, with its
    cause, instead of a minute of download retries)."""
    try:
        return _load_hub_layouts(name, {**hub_kwargs, "local_files_only": True})
    except OSError as err:
        if hub_kwargs.get("local_files_only"):
            raise _not_found(name, f"it is not in the Hugging Face cache ({err})") from err
    _check_hub_id(name)
    try:
        return _load_hub_layouts(name, hub_kwargs)
    except OSError as err:
        raise _not_found(name, f"loading it from the Hugging Face Hub failed ({err})") from err


def _load_hub_layouts(name: str, hub_kwargs: dict) -> tuple:
    """The flat ``google/ddpm-*`` layout first, then the ``DDPMPipeline`` one."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet_kwargs = _unet_kwargs(hub_kwargs)
    with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        try:
            unet = UNet2DModel.from_pretrained(name, **unet_kwargs)
        except OSError:
            unet = UNet2DModel.from_pretrained(name, subfolder="unet", **unet_kwargs)
        try:
            return unet, DDPMScheduler.load_config(name, **hub_kwargs)
        except OSError:
            return unet, DDPMScheduler.load_config(name, subfolder="scheduler", **hub_kwargs)


def _check_hub_id(name: str) -> None:
    """Ask the Hub once (no retries) whether ``name`` is a model there."""
    import huggingface_hub

    try:
        huggingface_hub.model_info(name, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError as err:
        raise _not_found(name, "the Hugging Face Hub has no model of that name") from err
    except huggingface_hub.errors.HfHubHTTPError:
        return  # the Hub answered (gated, rate-limited...): let the download say more
    except Exception as err:  # no network: the download would retry for a minute
        raise _not_found(name, f"the Hugging Face Hub cannot be reached ({err})") from err


def _not_found(name: str, why: str) -> OSError:
    here = Path(name).expanduser().absolute()
    return OSError(
        f"could not load the prior {name!r}: there is no folder {here} and {why}. If it is a "
        "local folder, give its path (absolute, or relative to the working directory "
        f"{Path.cwd()}); offline, give a local folder (`dmaudit train-prior` makes one) or one of "
        + ", ".join(f"embedded:{n}" for n in EMBEDDED_PRIORS)
    )


def _ddpm_scheduler(config):
    """A ``DDPMScheduler`` from a loaded config (old configs name ``num_train_timesteps``
    ``timesteps``)."""
    from diffusers import DDPMScheduler

    config = dict(config)
    if "timesteps" in config and "num_train_timesteps" not in config:
        config["num_train_timesteps"] = config.pop("timesteps")
    return DDPMScheduler.from_config(config)


def _content_shape(local: Path) -> list[int] | None:
    """The image shape a prior trained by ``dmaudit train-prior`` records (before padding)."""
    meta = local / "training.json"
    if local.is_dir() and meta.is_file():
        return json.loads(meta.read_text()).get("image_shape")
    return None


class DiffusionPrior:
    """A diffusers ``UNet2DModel`` and its noise schedule, used as an image prior for denoising.

    Args:
        unet: a ``diffusers.UNet2DModel`` trained on images in [-1, 1].
        alphas_cumprod: ``(T,)`` cumulative products ᾱ_t of the training schedule.
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        content_shape: ``(C, H, W)`` of the images the prior was trained on before zero-padding to
            the model's sample size (``None``: the model's own shape).
        device: where the model runs.
        dtype: compute precision: ``torch.float32``, or ``torch.bfloat16`` / ``torch.float16``
            (autocast; on CPU bf16 also switches to ``channels_last``). Weights stay fp32.
            ``"auto"``: bf16 where the device computes it natively (see :func:`native_bf16`),
            else fp32; on the benchmark's real digits bf16 matched fp32's quality at 2.3x the
            throughput (``benchmarks/README.md``).
        resize: allow images whose size does not fit the prior (bilinear resizing to the
            model's grid and back, the noise level rescaled to match) and colour images through
            a grey prior; otherwise such images raise ``ValueError``. Grey images through a
            colour prior need no resizing: they stay grey (see :meth:`fit_plan`).
        source: where the prior came from (for reports).
    """

    def __init__(
        self,
        unet,
        alphas_cumprod: torch.Tensor,
        *,
        prediction_type: str = "epsilon",
        content_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        resize: bool = False,
        source: str = "",
    ) -> None:
        if dtype == "auto":
            dtype = torch.bfloat16 if native_bf16(device) else torch.float32
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        if dtype == torch.bfloat16 and self.device.type == "cpu":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.sigma_t = sigma_schedule(self.alphas_cumprod)
        self.prediction_type = prediction_type
        cfg = unet.config
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.model_shape = (int(cfg.in_channels), *map(int, size))
        self.content_shape = tuple(content_shape) if content_shape else self.model_shape
        self.resize = resize
        self.source = source

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "auto",
        resize: bool = False,
        **hub_kwargs,
    ) -> DiffusionPrior:
        """Load a prior from a hub id, a local directory, or ``"embedded:<name>"``.

        Accepts the ``DDPMPipeline`` layout (``unet/`` and ``scheduler/`` folders) and the flat layout
        of ``google/ddpm-*`` (``config.json`` and ``scheduler_config.json`` side by side).

        Args:
            name_or_path: e.g. ``"google/ddpm-cifar10-32"``, ``"./my-prior"``, ``"embedded:mnist"``.
            device: where the model runs.
            dtype: compute precision (see the class); ``"auto"`` by default.
            resize: allow images that do not fit the prior (see the class).
            **hub_kwargs: passed to diffusers' ``from_pretrained`` (``revision``, ``cache_dir``,
                ``local_files_only``, ...).
        """
        name = str(name_or_path)
        check_prior_name(name_or_path)
        path = _prior_path(name)
        if Path(path).is_dir():
            unet, scheduler_config = _load_local(path, hub_kwargs)
        elif name != path or Path(path).exists() or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"no prior at {name!r}")
        else:
            unet, scheduler_config = _load_hub(name, hub_kwargs)
        scheduler = _ddpm_scheduler(scheduler_config)
        return cls(
            unet,
            scheduler.alphas_cumprod,
            prediction_type=scheduler.config.prediction_type,
            content_shape=_content_shape(Path(path)),
            device=device,
            dtype=dtype,
            resize=resize,
            source=name,
        )

    # -- shapes ----------------------------------------------------------------------------------
    def check_fits(self, image_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless images of ``(C, H, W)`` fit the prior (see :meth:`fit_plan`)."""
        self.fit_plan(image_shape)

    def fit_plan(self, image_shape: Sequence[int]) -> tuple[str | None, str | None]:
        """How images of ``(C, H, W)`` reach the model: ``(channel map, spatial map)``.

        Channels: ``None`` (they match), ``"grey->rgb"`` (grey images through a colour prior:
        the grey channel is replicated in and the three output channels are averaged out, so
        grey stays grey; always allowed, nothing is lost) or ``"rgb->grey"`` (colour images
        through a grey prior: their colour is lost; only with ``resize=True``).
        Space: ``None`` (the model's size), ``"pad"`` (the prior's content size, zero-padded to
        the model's and cropped back exactly) or ``"resize"`` (bilinear, antialiased when
        shrinking; only with ``resize=True``).

        Raises:
            ValueError: the images do not fit and ``resize`` is off, or no channel map exists.
        """
        c, h, w = (int(s) for s in image_shape)
        mc, mh, mw = self.model_shape
        if c == mc:
            channels = None
        elif c == 1 and mc == 3:
            channels = "grey->rgb"
        elif c == 3 and mc == 1:
            channels = "rgb->grey"
        else:
            raise ValueError(
                f"cannot map {c}-channel images to the prior's {mc} channels; use a prior "
                f"trained on {c}-channel images (dmaudit train-prior)"
            )
        if (h, w) == (mh, mw):
            spatial = None
        elif (h, w) == tuple(self.content_shape[1:]):
            spatial = "pad"
        else:
            spatial = "resize"
        if (spatial == "resize" or channels == "rgb->grey") and not self.resize:
            what = "colour" if channels == "rgb->grey" else f"{h}x{w}"
            raise ValueError(
                f"the prior {self.source or ''} models {mc}x{mh}x{mw} images (content "
                f"{'x'.join(map(str, self.content_shape))}), but the images are {c}x{h}x{w}. "
                "Use a prior trained on such images (dmaudit train-prior), or pass resize=True "
                f"to map {what} images onto the prior (this changes what the prior sees"
                + (": their colour is lost)." if channels == "rgb->grey" else ").")
            )
        return channels, spatial

    def _to_model(
        self, x: torch.Tensor, noise_std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images on the model's grid and their per-pixel noise std there (``[0, 1]`` units).

        Replicating a grey channel copies its noise into all three channels: luminance noise of
        std ``s`` is what independent noise of std ``s·√3`` per channel leaves after the
        channel average, so the model is asked to remove ``s·√3`` (measured better than ``s``
        on grey CIFAR-10 through ``embedded:natural``: ``benchmarks/README.md``). Averaging three
        channels divides independent noise by ``√3``. Resizing scales the noise std by the
        resampling operator's root-mean-square row norm (exact for independent noise;
        upsampled noise is also spatially correlated, which the prior was not trained for).
        """
        channels, spatial = self.fit_plan(x.shape[1:])
        mc, mh, mw = self.model_shape
        s = noise_std.double()
        if channels == "grey->rgb":
            x, s = x.expand(-1, 3, -1, -1), s * math.sqrt(3.0)
        elif channels == "rgb->grey":
            x, s = x.mean(dim=1, keepdim=True), s / math.sqrt(3.0)
        h, w = x.shape[2:]
        if spatial == "pad":
            top, left = (mh - h) // 2, (mw - w) // 2
            x = F.pad(x, (left, mw - w - left, top, mh - h - top))
        elif spatial == "resize":
            x = _resize(x, (mh, mw))
            s = s * _resize_gain(h, mh) * _resize_gain(w, mw)
        return x.contiguous(), s

    def _from_model(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The inverse of :meth:`_to_model`: crop or resize back, then map the channels back."""
        channels, spatial = self.fit_plan(shape)
        c, h, w = shape
        if spatial == "pad":
            top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
            x = x[:, :, top : top + h, left : left + w]
        elif spatial == "resize":
            x = _resize(x, (h, w))
        if channels == "grey->rgb":
            x = x.mean(dim=1, keepdim=True)
        elif channels == "rgb->grey":
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()

    # -- the model -------------------------------------------------------------------------------
    def _predict(self, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` at per-image timesteps ``t`` (x0 clipped to [-1, 1])."""
        a = self.alphas_cumprod[t].to(self.device, torch.float32).view(-1, 1, 1, 1)
        inp = xt
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            out = self.unet(inp, t.to(self.device)).sample
        out = out.float()
        if self.prediction_type == "epsilon":
            x0 = (xt - (1 - a).sqrt() * out) / a.sqrt()
        elif self.prediction_type == "sample":
            x0 = out
        else:  # v-prediction: v = sqrt(a)·eps − sqrt(1−a)·x0
            x0 = a.sqrt() * xt - (1 - a).sqrt() * out
        x0 = x0.clamp(-1, 1)
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
        return x0, eps

    # -- Algorithm 1 -----------------------------------------------------------------------------
    def timesteps_for(self, noise_std: torch.Tensor | float) -> torch.Tensor:
        """The matched timestep ``t*`` of each noise std given in [0, 1] image units."""
        s = torch.as_tensor(noise_std, dtype=torch.float64).flatten()
        return match_timesteps(self.sigma_t, 2.0 * s)  # [0, 1] -> [-1, 1] doubles the std

    @torch.no_grad()
    def denoise(
        self,
        images: torch.Tensor,
        *,
        noise_std: float | Sequence[float] | torch.Tensor | None = None,
        sampler: str | SamplerSettings = "ddim",
        steps: int | None = None,
        min_stride: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Denoise readouts with the prior (Algorithm 1).

        Args:
            images: ``(N, C, H, W)`` noisy images in [0, 1] units (values outside are allowed).
            noise_std: per-pixel Gaussian noise std in [0, 1] units: one for all, one per image, or
                ``None`` to estimate it per image (``skimage.restoration.estimate_sigma``).
            sampler: a :class:`~opacus_dmaudit.reconstruct.sampler.SamplerSettings` or a
                sampler's name: ``"ddim"``, ``"ddim-every-step"`` (the paper's loop),
                ``"ancestral"`` or ``"posterior-mean"`` (see the module docstring).
            steps: the most DDIM steps from ``t*`` (``"ddim"`` only; default: the settings').
            min_stride: fewest timesteps one DDIM step spans: an image whose ``t*`` is small
                takes ``ceil((t* + 1) / min_stride)`` steps instead of ``steps`` (a readout with
                little noise needs few steps). 1 always takes ``steps`` (default: the
                settings').
            generator: drives the noise of the ``"ancestral"`` sampler (a fresh seeded one if ``None``;
                the global RNG is never used).
            batch_size: images per model call.

        Returns:
            ``(N, C, H, W)`` reconstructions in [0, 1], on the CPU.
        """
        settings = _settings(sampler, steps, min_stride)
        images = _as_batch(images)
        _check_finite(images)
        shape = tuple(int(s) for s in images.shape[1:])
        self.check_fits(shape)
        n = images.shape[0]
        s = self.estimate_noise_std(images) if noise_std is None else _noise_levels(noise_std, n)
        if n == 0:
            return images.float().clone()
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        out = []
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size].to(self.device, torch.float32)
            model_in, s_model = self._to_model(chunk, s[start : start + batch_size])
            y = model_in * 2 - 1
            t_star = self.timesteps_for(s_model)
            if settings.name == "ddim-every-step":  # t*, t*−1, …, 1: t* model calls (one at t* = 0)
                n_steps = t_star.clamp(min=1)
            else:
                n_steps = ((t_star + settings.min_stride) // settings.min_stride).clamp(
                    max=settings.steps
                )
            x0 = self._reverse(y, t_star, sampler=settings.name, steps=n_steps, generator=generator)
            out.append(self._from_model(((x0 + 1) / 2).clamp(0, 1), shape).cpu())
        return torch.cat(out)

    def _reverse(self, y, t_star, *, sampler, steps, generator) -> torch.Tensor:
        a_star = self.alphas_cumprod[t_star].to(self.device, torch.float32).view(-1, 1, 1, 1)
        x = a_star.sqrt() * y  # = y / sqrt(1 + σ_{t*}^2): x_{t*} without fresh noise
        if sampler == "posterior-mean":
            return self._predict(x, t_star)[0]
        if sampler in ("ddim", "ddim-every-step"):
            return self._ddim(x, t_star, steps)
        return self._ancestral(x, t_star, generator)

    def _ddim(self, x, t_star, steps: torch.Tensor) -> torch.Tensor:
        """DDIM (η = 0); image ``i`` takes ``steps[i]`` steps on its own grid from ``t*_i``."""
        ac = self.alphas_cumprod
        x0 = torch.zeros_like(x)
        n = steps.double()
        for k in range(int(steps.max())):
            idx = (steps > k).nonzero().flatten()  # images still on their grid
            t = torch.round(t_star[idx].double() * (n[idx] - k) / n[idx]).long()
            t_next = torch.round(t_star[idx].double() * (n[idx] - k - 1) / n[idx]).long()
            dev = idx.to(self.device)
            x0_a, eps = self._predict(x[dev], t)
            x0[dev] = x0_a
            last = (steps[idx] == k + 1).view(-1, 1, 1, 1).to(self.device)
            a_next = ac[t_next].to(self.device, torch.float32).view(-1, 1, 1, 1)
            moved = (t_next < t).view(-1, 1, 1, 1).to(self.device)
            step = torch.where(moved, a_next.sqrt() * x0_a + (1 - a_next).sqrt() * eps, x[dev])
            x[dev] = torch.where(last, x[dev], step)
        return x0

    def _ancestral(self, x, t_star, generator) -> torch.Tensor:
        ac = self.alphas_cumprod
        x0 = torch.zeros_like(x)
        for t in range(int(t_star.max()), -1, -1):
            idx = (t_star >= t).nonzero().flatten().to(self.device)  # images already started
            x0_a, _ = self._predict(x[idx], torch.full((idx.numel(),), t, dtype=torch.long))
            x0[idx] = x0_a
            if t == 0:
                break
            a_t, a_prev = float(ac[t]), float(ac[t - 1])
            beta = 1 - a_t / a_prev
            c0 = math.sqrt(a_prev) * beta / (1 - a_t)  # posterior mean of x_{t-1} given x_t, x0
            ct = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
            var = beta * (1 - a_prev) / (1 - a_t)
            z = torch.randn(x0_a.shape, generator=generator).to(self.device)
            x[idx] = c0 * x0_a + ct * x[idx] + math.sqrt(var) * z
        return x0

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def estimate_noise_std(images: torch.Tensor) -> torch.Tensor:
        """Per-image Gaussian noise std (wavelet MAD, ``skimage.restoration.estimate_sigma``)."""
        from skimage.restoration import estimate_sigma

        arr = torch.as_tensor(images).detach().float().cpu().numpy()
        vals = []
        for img in arr:
            if img.shape[0] == 1:
                vals.append(estimate_sigma(img[0]))
            else:
                vals.append(
                    estimate_sigma(np.moveaxis(img, 0, -1), channel_axis=-1, average_sigmas=True)
                )
        return torch.tensor(vals, dtype=torch.float64)

    @torch.no_grad()
    def sample(
        self, num_images: int, *, steps: int = 50, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Unconditional samples in [0, 1] (DDIM from pure noise), cropped to the content shape."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        t_max = len(self.alphas_cumprod) - 1
        x = torch.randn((num_images, *self.model_shape), generator=generator).to(self.device)
        t_star = torch.full((num_images,), t_max, dtype=torch.long)
        x0 = self._ddim(x, t_star, torch.full_like(t_star, steps))
        return self._from_model(((x0 + 1) / 2).clamp(0, 1).cpu(), self.content_shape)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def describe(self) -> dict:
        """What the prior is, for logs and reports."""
        return {
            "source": self.source,
            "model_shape": list(self.model_shape),
            "content_shape": list(self.content_shape),
            "parameters": self.num_parameters,
            "timesteps": len(self.alphas_cumprod),
            "prediction_type": self.prediction_type,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def _settings(sampler, steps: int | None, min_stride: int | None) -> SamplerSettings:
    """The sampler settings of a :meth:`DiffusionPrior.denoise` call (explicit steps win)."""
    settings = SamplerSettings.of(sampler)
    return SamplerSettings(
        name=settings.name,
        steps=settings.steps if steps is None else steps,
        min_stride=settings.min_stride if min_stride is None else min_stride,
    )


def _as_batch(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    return images


def _check_finite(images: torch.Tensor) -> None:
    """Refuse NaN or infinite pixels: the network would return NaN for them without a word."""
    bad = (~torch.isfinite(images.float())).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"images {bad[:10]} have NaN or infinite pixels: the prior cannot denoise them "
            "(it would return NaN); leave them out or replace the pixels first "
            "(torch.nan_to_num)"
        )


def _noise_levels(noise_std, n: int) -> torch.Tensor:
    """One noise std per image, checked."""
    s = torch.as_tensor(noise_std, dtype=torch.float64).flatten()
    if s.numel() == 1:
        s = s.expand(n)
    if s.numel() != n:
        raise ValueError(f"noise_std has {s.numel()} values for {n} images")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("noise_std must be finite and non-negative")
    return s
