"""A wavelet-scattering front end (kymatio's Scattering2D) with a content-addressed feature cache.

Why: Tramèr & Boneh 2021 ("Differentially Private Learning Needs Better Features") show that
a fixed, data-independent feature extractor (a ScatterNet, J=2, 8 angles) followed by a
normalisation layer and a linear model learns far better under DP-SGD than an end-to-end CNN
at the same epsilon: the private part has few parameters, so the same noise hurts less.

The transform has no trainable parameters and depends on no record, so it costs no privacy
and needs no per-sample gradients (Opacus and book-keeping mode see only the layers after it).
It is slow on a CPU (about 80 images/s on this project's shared 2-core machine), and every site
would otherwise recompute it for every batch of every round, so its output is cached:

* in memory, per process, keyed by a hash of each image's bytes (an image seen again, in
  another round or another batch, is looked up, never recomputed);
* on disk, in ``$FEDGUARD_CACHE_DIR`` (default ``~/.cache/fedguard``), one ``.npz`` shard per
  :func:`warm` chunk, so a site (or a simulation's worker processes) pays once per image.

The disk cache holds a deterministic function of the site's own images on the site's own
machine: it is as sensitive as the images themselves and never leaves the site.
Features are stored as float16 (about 1e-3 relative error) and always returned through that
rounding, so a cached and a freshly computed feature are bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

KEY_BYTES = 16
WARM_CHUNK = 2000


def scattering_channels(scale: int, angles: int) -> int:
    """Output channels per input channel of a 2nd-order scattering: 1 + J L + L^2 J (J-1) / 2."""
    return 1 + scale * angles + angles * angles * scale * (scale - 1) // 2


def check_scattering_shape(input_shape: tuple[int, ...], scale: int, angles: int) -> None:
    """Refuse, naming the config keys, shapes the transform cannot take."""
    if len(input_shape) != 3:
        raise ValueError(f"model=scatter_linear needs images (C, H, W); got input shape {tuple(input_shape)}")
    if scale < 1 or angles < 1:
        raise ValueError(f"model.scattering_scale={scale} and model.scattering_angles={angles} must be >= 1")
    _, height, width = input_shape
    if height < 2**scale or width < 2**scale:
        raise ValueError(f"model.scattering_scale={scale} needs images of at least {2**scale}x{2**scale}; "
                         f"got {height}x{width}")


@lru_cache(maxsize=4)
def _transform(scale: int, angles: int, height: int, width: int):
    # kymatio's NumPy front end: on this project's shared 2-core machine it ran 200 images in
    # 2.4 s against 3.9 s for the torch front end with one thread and 33 s with two (torch's
    # intra-op threads under contention), same output within 2e-7. Imported from its module:
    # kymatio.numpy also imports the 3-D transform, which needs scipy.special.sph_harm (gone
    # in scipy 1.17); the 2-D front end does not.
    from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D

    return ScatteringNumPy2D(J=scale, shape=(height, width), L=angles)


def cache_root() -> Path:
    return Path(os.environ.get("FEDGUARD_CACHE_DIR") or Path.home() / ".cache" / "fedguard")


class FeatureCache:
    """In-memory map from an image's hash to its scattering features, backed by disk shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._rows: dict[bytes, np.ndarray] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()

    def load_new_shards(self) -> None:
        """Read shards written since the last call (by this or another process)."""
        if not self.folder.is_dir():
            return
        if self.folder.stat().st_mode & 0o077:  # a cache written before fedguard kept it to its user
            logger.warning("scattering cache %s was readable by other users; now 0700", self.folder)
            self.folder.chmod(0o700)
        for path in sorted(self.folder.glob("*.npz")):
            if path.name in self._loaded:
                continue
            try:
                with np.load(path) as shard:
                    keys, features = shard["keys"], shard["features"]
            except (OSError, ValueError, KeyError) as err:  # a damaged shard is recomputed, not trusted
                logger.warning("ignoring unreadable scattering cache shard %s: %s", path, err)
                self._loaded.add(path.name)
                continue
            for key, row in zip(keys, features, strict=True):
                self._rows.setdefault(key.tobytes(), row)
            self._loaded.add(path.name)

    def lookup(self, keys: list[bytes]) -> list[np.ndarray | None]:
        return [self._rows.get(key) for key in keys]

    def add(self, keys: list[bytes], features: np.ndarray, *, persist: bool) -> None:
        for key, row in zip(keys, features, strict=True):
            self._rows[key] = row
        if persist and keys:
            # Features of a site's images say as much as the images: only the site's own user reads them.
            self.folder.mkdir(parents=True, exist_ok=True)
            self.folder.chmod(0o700)
            name = f"{uuid.uuid4().hex}.npz"
            tmp = self.folder / f".{name}.tmp"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
                np.savez(handle, keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES),
                         features=features)
            os.replace(tmp, self.folder / name)
            self._loaded.add(name)


_CACHES: dict[str, FeatureCache] = {}


def _cache_for(namespace: str) -> FeatureCache:
    cache = _CACHES.get(namespace)
    if cache is None:
        cache = _CACHES[namespace] = FeatureCache(cache_root() / "scattering" / namespace)
        cache.load_new_shards()
    return cache


class ScatteringFrontEnd(nn.Module):
    """Fixed scattering transform of (N, C, H, W) images -> (N, C * K, H / 2^J, W / 2^J).

    No parameters and no buffers: the model's state dict (what clients send and the server
    aggregates) holds only the trainable layers after it.
    """

    def __init__(self, input_shape: tuple[int, ...], scale: int = 2, angles: int = 8) -> None:
        super().__init__()
        check_scattering_shape(tuple(input_shape), scale, angles)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.scale, self.angles = int(scale), int(angles)
        self.out_channels = self.input_shape[0] * scattering_channels(self.scale, self.angles)
        from importlib.metadata import version

        c, h, w = self.input_shape
        self.namespace = f"kymatio{version('kymatio')}-numpy-J{self.scale}-L{self.angles}-{c}x{h}x{w}"

    @property
    def output_shape(self) -> tuple[int, int, int]:
        _, h, w = self.input_shape
        return self.out_channels, h // 2**self.scale, w // 2**self.scale

    def _keys(self, images: np.ndarray) -> list[bytes]:
        return [hashlib.blake2b(row.tobytes(), digest_size=KEY_BYTES).digest() for row in images]

    def _compute(self, images: np.ndarray) -> np.ndarray:
        _, h, w = self.input_shape
        transform = _transform(self.scale, self.angles, h, w)
        return np.asarray(transform(images)).reshape(len(images), *self.output_shape).astype(np.float16)

    def features(self, images: np.ndarray, *, persist: bool = False) -> np.ndarray:
        """Features of ``images`` (float32 array, N x C x H x W), from the cache where present."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape[1:] != self.input_shape:
            raise ValueError(f"scattering front end built for {self.input_shape}, got images {images.shape[1:]}")
        cache = _cache_for(self.namespace)
        keys = self._keys(images)
        with cache._lock:
            found = cache.lookup(keys)
            missing = [i for i, row in enumerate(found) if row is None]
            if missing:
                computed = self._compute(images[missing])
                cache.add([keys[i] for i in missing], computed, persist=persist)
                for i, row in zip(missing, computed, strict=True):
                    found[i] = row
        if not found:
            return np.zeros((0, *self.output_shape), dtype=np.float32)
        return np.stack(found).astype(np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(out).to(x.device)


def warm(front: ScatteringFrontEnd, images: np.ndarray) -> int:
    """Compute and store on disk the features of every image not cached yet; returns how many."""
    cache = _cache_for(front.namespace)
    cache.load_new_shards()
    images = np.ascontiguousarray(images, dtype=np.float32)
    keys = front._keys(images)
    missing = [i for i, row in enumerate(cache.lookup(keys)) if row is None]
    for start in range(0, len(missing), WARM_CHUNK):
        chunk = missing[start:start + WARM_CHUNK]
        front.features(images[chunk], persist=True)
        logger.info("scattering features: %d of %d images computed", start + len(chunk), len(missing))
    return len(missing)


def warm_model(model: nn.Module, images: np.ndarray) -> int:
    """Warm the cache of every scattering front end in ``model`` for ``images`` (0 when it has none).

    Called wherever a whole array is about to go through a model batch by batch (a client's
    training split, the server's test split), so the slow transform runs once per image.
    """
    return sum(warm(m, images) for m in model.modules() if isinstance(m, ScatteringFrontEnd))
