"""The scattering front end (model=scatter_linear): kymatio's transform, cached per image.

The cache must be invisible: a cached feature equals the computed one bit for bit, a fresh
process reads what another wrote, the model's state dict (what sites send) holds only the
trained layers, and bad settings are refused naming the key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D

from fedguard.clients import scattering
from fedguard.clients.models import build_model
from fedguard.clients.scattering import ScatteringFrontEnd, scattering_channels, warm, warm_model
from fedguard.conf import ConfigError, compose_config


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGUARD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(scattering, "_CACHES", {})
    return tmp_path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def test_features_are_kymatios_transform_and_cached_bit_for_bit(fresh_cache):
    front = ScatteringFrontEnd((1, 8, 8))
    images = _images(5)
    first = front.features(images)
    reference = ScatteringNumPy2D(J=2, shape=(8, 8), L=8)(images).reshape(5, 81, 2, 2)
    assert first.shape == (5, 81, 2, 2) == (5, *front.output_shape)
    np.testing.assert_allclose(first, reference, rtol=2e-3, atol=1e-4)  # float16 storage
    # the same images again, in another order and mixed with new ones: cached rows are identical
    again = front.features(np.concatenate([images[::-1], _images(2, seed=1)]))
    assert np.array_equal(again[:5], first[::-1])
    assert not list(fresh_cache.rglob("*.npz"))  # only warm() writes to disk


def test_a_fresh_process_reads_what_warm_wrote(fresh_cache, monkeypatch):
    front = ScatteringFrontEnd((1, 8, 8))
    images = _images(7)
    assert warm(front, images) == 7
    assert warm(front, images) == 0
    written = front.features(images)
    folder = fresh_cache / "scattering" / front.namespace
    assert folder.stat().st_mode & 0o777 == 0o700  # features reveal the images: the site's user only
    assert [shard.stat().st_mode & 0o777 for shard in folder.iterdir()] == [0o600]
    folder.chmod(0o755)  # as caches written before the fix were left
    monkeypatch.setattr(scattering, "_CACHES", {})  # as a new process would start
    monkeypatch.setattr(ScatteringFrontEnd, "_compute", lambda self, x: pytest.fail("recomputed a cached image"))
    assert np.array_equal(ScatteringFrontEnd((1, 8, 8)).features(images), written)
    assert folder.stat().st_mode & 0o777 == 0o700  # closed again when read


def test_a_damaged_shard_is_ignored_and_recomputed(fresh_cache):
    front = ScatteringFrontEnd((1, 8, 8))
    folder = fresh_cache / "scattering" / front.namespace
    folder.mkdir(parents=True)
    (folder / "broken.npz").write_bytes(b"not a shard")
    images = _images(3)
    assert warm(front, images) == 3
    np.testing.assert_allclose(front.features(images),
                               ScatteringNumPy2D(J=2, shape=(8, 8), L=8)(images).reshape(3, 81, 2, 2),
                               rtol=2e-3, atol=1e-4)


@pytest.mark.simulation  # kymatio's filter bank and a config composition: over a second under load
def test_model_trains_only_the_layers_after_the_transform(fresh_cache):
    cfg = compose_config(["model=scatter_linear", "dataset=digits"])
    model = build_model(cfg.model, (1, 8, 8), 10, private=True)
    assert sorted(model.state_dict()) == ["1.bias", "1.weight", "3.bias", "3.weight"]  # GroupNorm, Linear
    assert model[1].num_groups == 27 and model[3].in_features == 81 * 2 * 2
    assert warm_model(model, _images(4)) == 4
    logits = model(torch.from_numpy(_images(4)))
    assert logits.shape == (4, 10)
    assert scattering_channels(2, 8) == 81 and scattering_channels(3, 4) == 1 + 12 + 48


@pytest.mark.simulation  # a config composition: over a second under load
def test_the_dp_images_preset_picks_the_scattering_model_and_dp_sized_batches():
    cfg = compose_config(["+preset=dp_images", "dataset=fashion_mnist", "privacy=sample_dp",
                          "privacy.target_epsilon=3"])
    assert cfg.model.name == "scatter_linear" and cfg.model.group_norm_groups == 27
    assert (cfg.train.batch_size, cfg.train.learning_rate, cfg.privacy.max_grad_norm) == (1024, 4.0, 0.1)
    assert cfg.train.local_epochs == 3  # chosen on validation: more clipped steps at the same epsilon
    # a user's own choice still wins over the preset
    assert compose_config(["+preset=dp_images", "dataset=fashion_mnist", "train.batch_size=256"]).train.batch_size == 256


@pytest.mark.simulation  # four config compositions: over a second under load
def test_bad_scattering_settings_are_refused_naming_the_key():
    for override, key in (("model.group_norm_groups=10", "model.group_norm_groups"),
                          ("model.scattering_scale=0", "model.scattering_scale"),
                          ("model.scattering_angles=40", "model.scattering_angles")):
        with pytest.raises(ConfigError, match=key):
            compose_config(["model=scatter_linear", "dataset=digits", override])
    with pytest.raises(ConfigError, match="model=scatter_linear needs an image dataset"):
        compose_config(["model=scatter_linear", "dataset=breast_cancer"])
    with pytest.raises(ValueError, match="model.scattering_scale=3 needs images of at least 8x8"):
        ScatteringFrontEnd((1, 6, 6), scale=3)
