"""The two tasks of the training loop (training.tasks): the VAE objective, the encoding cache of the
LDM task, the held-out split both validate on, and `train-vae` -> `train` through Ray and MLflow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from data_prep.dataset import read_dataset
from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic
from training.config import config_from_dict, load_config
from training.loader.batch import Batch, held_out, read_split
from training.loader.stream import ShardStream
from training.models.assembly import build_components
from training.tasks.ldm import EncodingCache, LatentDiffusionTask
from training.tasks.vae import AutoencoderTask, autoencoder_loss, kl_per_element, psnr, reconstruction_metrics

CPU = torch.device("cpu")


def pixels(n: int, seed: int = 0, side: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- the VAE objective -------------------------------------------------------------------------


def test_autoencoder_loss_is_mse_plus_the_weighted_kl():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    recon = x + 0.1 * torch.randn(x.shape, generator=g)
    mean, logvar = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g) * 0.1
    mse = (recon - x).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    assert autoencoder_loss(x, recon, mean, logvar, 0.0) == pytest.approx(float(mse), rel=1e-6)
    assert autoencoder_loss(x, recon, mean, logvar, 0.5) == pytest.approx(float(mse + 0.5 * kl), rel=1e-6)
    # The KL is zero exactly at the prior, and grows away from it.
    assert float(kl_per_element(torch.zeros(4), torch.zeros(4))) == 0.0
    assert kl_per_element(torch.ones(4), torch.zeros(4)) > 0


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 3, 4, 4)
    # An error of 0.02 everywhere on the [-1, 1] range (peak-to-peak 2): 10 log10(4 / 0.0004) = 40 dB.
    assert float(psnr(x, x + 0.02)) == pytest.approx(40.0, abs=1e-3)
    # Out-of-range reconstructions are clamped, as they are displayed.
    assert float(psnr(torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 3.0))) > 90


def test_vae_task_trains_its_autoencoder_and_the_kl_weight_changes_the_loss():
    losses = {}
    for weight in (0.0, 1.0):
        cfg = load_config("shapes-vae", [f"train.kl_weight={weight}"])
        task = AutoencoderTask(cfg, seed=0, device=CPU)
        batch = Batch(pixels=pixels(4), captions=[""] * 4, keys=list("abcd"))
        loss = task.loss(task.module, batch, torch.Generator().manual_seed(1))
        loss.backward()
        losses[weight] = float(loss.detach())
        grads = [p.grad for p in task.module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert losses[1.0] > losses[0.0]  # same draws, plus a positive KL
    metrics = reconstruction_metrics(task.module.vae, Batch(pixels=pixels(3, 2), captions=[""] * 3, keys=list("xyz")),
                                     CPU)
    assert set(metrics) == {"val_psnr", "val_mse", "val_kl"} and 0 < metrics["val_psnr"] < 60


# --- the LDM task's encoding cache -------------------------------------------------------------


def test_cached_encodings_give_the_same_loss_and_skip_the_encoders():
    results = {}
    for cache in (False, True):
        cfg = load_config("shapes", [f"train.cache_encodings={str(cache).lower()}"])
        parts = build_components(cfg.model, seed=0)
        task = LatentDiffusionTask(cfg, parts, device=CPU)
        calls = SimpleNamespace(vae=0, text=0)
        encode, text_encode = parts.vae.encode, parts.text.encode
        parts.vae.encode = lambda x: (setattr(calls, "vae", calls.vae + len(x)), encode(x))[1]
        parts.text.encode = lambda c, d: (setattr(calls, "text", calls.text + len(c)), text_encode(c, d))[1]
        batch = Batch(pixels=pixels(4), captions=["a red circle on a blue background"] * 2 + ["a"] * 2,
                      keys=["k0", "k1", "k2", "k3"])
        generator = torch.Generator().manual_seed(3)
        losses = [float(task.loss(parts.unet, batch, generator).detach()) for _ in range(3)]
        results[cache] = (losses, calls)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert results[False][1].vae == 12
    assert results[True][1].vae == 4  # each sample encoded once
    assert results[True][1].text <= 3  # each distinct caption (and "" after dropout) once


def test_encoding_cache_keys_by_sample_and_caption():
    cache = EncodingCache()
    batch = Batch(pixels=pixels(2), captions=["x", "y"], keys=["a", "b"])
    mean, std = cache.moments(batch, lambda p: (p.float()[:, :1], torch.ones(len(p), 1, 32, 32)))
    again, _ = cache.moments(Batch(pixels=pixels(2, seed=9), captions=["x", "y"], keys=["b", "a"]),
                             lambda p: pytest.fail("cached samples are not encoded again"))
    assert torch.equal(again[0], mean[1]) and torch.equal(again[1], mean[0]) and len(cache) == 2
    states = cache.text(["x", "x", "y"], lambda cs: torch.stack([torch.full((2, 3), float(ord(c))) for c in cs]))
    assert states.shape == (3, 2, 3) and torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


# --- the held-out split ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    generate_synthetic(root / "raw", 120, seed=8, image_size=32)
    out = str(root / "shards")
    build_shards(ShardConfig(source=str(root / "raw"), output=out, resolution=32, samples_per_shard=25,
                             progress=False))
    return out


def test_the_split_is_by_key_and_training_never_sees_held_out_samples(shards):
    dataset = read_dataset(shards)
    keys = read_split(dataset, 0.0, 32, 1000, held=False).keys  # every sample, held out by none
    assert len(set(keys)) == 120
    held = {k for k in keys if held_out(k, 0.2)}
    assert 10 <= len(held) <= 40  # about 24
    assert held == {k for k in keys if held_out(k, 0.2)}  # by key alone: the same every time
    assert not any(held_out(k, 0.0) for k in keys)

    stream = ShardStream(shards, rank=0, world_size=1, batch_size=8, resolution=32, seed=0, holdout_fraction=0.2)
    seen: set[str] = set()
    for batch, _ in zip(stream, range(30)):  # 240 samples: two epochs of the 96-odd training ones
        seen.update(batch.keys)
    assert seen == set(keys) - held
    assert stream.state.streams[0]["skipped"]["held_out"] >= 2 * len(held)

    validation = read_split(dataset, 0.2, 32, 10)
    assert len(validation.keys) == 10 and set(validation.keys) <= held
    assert read_split(dataset, 0.2, 32, 10).keys == validation.keys  # the same samples every validation
    training = read_split(dataset, 0.2, 32, 10, held=False)
    assert not set(training.keys) & held


def test_a_split_with_nothing_held_out_is_refused(shards):
    from training.errors import DataError

    with pytest.raises(DataError, match="holds out none"):
        read_split(read_dataset(shards), 1e-9, 32, 4)


ALL_HELD = 0.999999999  # every one of the 120 keys hashes below it


def test_a_split_that_leaves_nothing_to_train_on_is_refused_before_training(shards):
    """Before, the training streams skipped held-out sample after sample and never yielded a batch."""
    import dataclasses

    from training.errors import DataError
    from training.loader.batch import trains_on_any
    from training.runtime.driver import check_data

    dataset = read_dataset(shards)
    assert all(held_out(k, ALL_HELD) for k in read_split(dataset, 0.0, 32, 1000, held=False).keys)
    cfg = load_config("tiny", ["model.resolution=32", f"validation.holdout_fraction={ALL_HELD}"])
    with pytest.raises(DataError, match="leaves none of the 120 samples .* for training"):
        check_data(cfg, shards)
    check_data(load_config("tiny", ["model.resolution=32", "validation.holdout_fraction=0.5"]), shards)
    # Parts written without a sample list are judged by their tar headers.
    unlisted = dataclasses.replace(dataset, parts=[dataclasses.replace(p, manifest=dataclasses.replace(
        p.manifest, samples_file="")) for p in dataset.parts])
    assert not trains_on_any(unlisted, ALL_HELD) and trains_on_any(unlisted, 0.5)
    # And a stream handed such a split stops with the reason instead of spinning.
    stream = ShardStream(shards, rank=0, world_size=1, batch_size=4, resolution=32, seed=0, holdout_fraction=ALL_HELD)
    with pytest.raises(DataError, match="held-out samples in a row"):
        next(iter(stream))


def test_validation_config_is_checked():
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match="validation.holdout_fraction"):
        config_from_dict({"validation": {"holdout_fraction": 1.0}})
    with pytest.raises(ConfigError, match="validation.timesteps"):
        config_from_dict({"validation": {"timesteps": [1000]}})
    with pytest.raises(ConfigError, match="`task` must be one of ldm, vae"):
        config_from_dict({"task": "gan"})
    with pytest.raises(ConfigError, match="model.vae.pretrained"):
        config_from_dict({"task": "vae", "model": {"vae": {"pretrained": "/somewhere"}}})


# --- a VAE named by an MLflow URI ----------------------------------------------------------------


def test_a_vae_logged_to_mlflow_loads_by_runs_uri_once(tmp_path):
    import mlflow

    from training.locations import runs_dir, setup_mlflow
    from training.mlops.export import save_vae
    from training.mlops.tracking import ensure_experiment
    from training.models.assembly import build_vae, new_vae
    from training.models.folders import ModelPathError

    cfg = load_config("shapes-vae")
    vae = new_vae(cfg.model.vae, resolution=32, seed=5)
    vae.register_to_config(scaling_factor=0.77)
    folder = save_vae(vae, tmp_path / "vae")
    setup_mlflow()
    # Our experiment, whose artifacts live in the runs folder (MLflow's Default one would use ./mlruns).
    with mlflow.start_run(experiment_id=ensure_experiment("ldmflow-vae-uri-test")) as run:
        mlflow.log_artifacts(str(folder), "vae")
    uri = f"runs:/{run.info.run_id}/vae"
    ldm = load_config("shapes", [f"model.vae.pretrained={uri}"])
    cache = runs_dir() / "model-cache"
    before = set(cache.iterdir()) if cache.is_dir() else set()  # other tests' models may be there
    loaded = build_vae(ldm.model.vae, resolution=32)
    assert loaded.config.scaling_factor == pytest.approx(0.77)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    cached = set(cache.iterdir())
    assert len(cached - before) == 1  # downloaded once, into one folder
    build_vae(ldm.model.vae, resolution=32)  # the second load reads the cache
    assert set(cache.iterdir()) == cached

    missing = load_config("shapes", [f"model.vae.pretrained=runs:/{run.info.run_id}/nothing"])
    with pytest.raises(ModelPathError, match="model.vae.pretrained"):
        build_vae(missing.model.vae, resolution=32)


def test_the_encoding_cache_is_bounded_and_drops_the_least_recently_used():
    """Before, it kept every sample's posterior and every caption's states, however large the data."""
    per_sample = 2 * 4 * 8 * 8 * 4  # mean and std, (4, 8, 8) fp32
    cache = EncodingCache(max_bytes=3 * per_sample)
    encoded: list[str] = []

    def encode(pixels):
        encoded.extend(str(int(p.flatten()[0])) for p in pixels)
        base = pixels.float().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return base.expand(-1, 4, 8, 8).clone(), base.expand(-1, 4, 8, 8).clone() + 1

    def batch(*ids):
        return Batch(pixels=torch.stack([torch.full((3, 2, 2), i, dtype=torch.uint8) for i in ids]),
                     captions=[""] * len(ids), keys=[str(i) for i in ids])

    cache.moments(batch(1, 2, 3), encode)
    cache.moments(batch(1), encode)  # 1 is now the most recently used
    cache.moments(batch(4), encode)  # over the bound: 2, the least recently used, goes
    assert cache.bytes <= 3 * per_sample and len(cache) == 3
    encoded.clear()
    mean, _ = cache.moments(batch(1, 3, 4, 2), encode)
    assert encoded == ["2"]  # only the evicted one is computed again
    assert [float(m[0, 0, 0]) for m in mean] == [1.0, 3.0, 4.0, 2.0]
