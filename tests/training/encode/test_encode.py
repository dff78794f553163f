"""`ldmflow encode` (training.encode) and training from its latents, in this process on real files: the
latent shards and their manifest, a rerun after an interrupted encode, the loader and the `ldm` loss
on latents against the pixel path, and every refusal of latents the config cannot train on."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.dataset import read_dataset, verify_dataset
from data_prep.errors import DataPrepError
from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic
from training.config import load_config
from training.encode.job import PENDING_NAME, encode_dataset, latent_shard_name
from training.errors import DataError
from training.loader.batch import read_split, to_model_input
from training.loader.latents import EMPTY_TEXT_NAME, latents_info
from training.loader.stream import ShardStream
from training.loader.tar_reader import ShardReader
from training.models.assembly import build_components, build_frozen, frozen_hashes
from training.tasks.diffusion_loss import kept_captions
from training.tasks.ldm import LatentDiffusionTask

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs/tiny.yaml")
RESOLUTION = ["model.resolution=32"]  # 8x8 latents of the tiny VAE: seconds, not minutes, on 2 cores
CPU = torch.device("cpu")


def tiny(*overrides: str):
    return load_config(TINY, [*RESOLUTION, *overrides])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    """24 synthetic 32 px samples in 3 raw shards of 8."""
    root = tmp_path_factory.mktemp("encode")
    generate_synthetic(root / "images", 24, seed=3, image_size=32)
    out = str(root / "shards")
    build_shards(ShardConfig(source=str(root / "images"), output=out, resolution=32, samples_per_shard=8,
                             progress=False))
    return out


@pytest.fixture(scope="module")
def latents(raw, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("latents") / "lat")
    report = encode_dataset(tiny(), raw, out, workers=0, batch_size=5)  # 5: batches straddle samples of a shard
    assert (report.shards, report.samples, report.encoded, report.kept) == (3, 24, 3, 0)
    return out


def raw_samples(raw: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for shard in read_dataset(raw).shards:
        reader = ShardReader(shard.uri, seek=(0, 0), first=0)
        for _ in range(shard.samples):
            key, members, _, _ = reader.read()
            out[key] = members
        reader.close()
    return out


def test_encode_writes_a_latent_shard_per_raw_shard_and_a_manifest_naming_the_encoders(raw, latents):
    source, dataset = read_dataset(raw), read_dataset(latents)
    info = latents_info(dataset)
    vae, text = build_frozen(tiny().model)
    # The manifest: which raw data, which exact encoders, scale, resolution, shapes.
    assert info.source_content_id == source.content_id
    assert {"vae": info.vae["sha256"], "text_encoder": info.text_encoder["sha256"]} == frozen_hashes(vae, text)
    assert info.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert (info.resolution, info.latent_shape, info.text_shape) == (32, (8, 8, 8), (32, 384))
    assert [s.name for s in dataset.shards] == [latent_shard_name(s) for s in source.shards]
    assert [s.samples for s in dataset.shards] == [s.samples for s in source.shards]
    assert dataset.content_id != source.content_id and dataset.content_sum == source.content_sum
    report = verify_dataset(latents)  # sizes, sha256 and sample counts as listed; no unfinished run's leftovers
    assert report.ok and report.orphans == [], (report.problems, report.orphans)

    # Each sample: the VAE posterior of its image (mean and std, scaled) and the text states of its caption.
    raws = raw_samples(raw)
    held = read_split(dataset, 0.0, 32, 24, held=False)
    assert sorted(held.keys) == sorted(raws)
    for i in (0, 13, 23):
        members = raws[held.keys[i]]
        meta = json.loads(members["json"])
        assert held.captions[i] == members["txt"].decode()
        image = torch.from_numpy(np.array(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))).permute(2, 0, 1)
        with torch.no_grad():
            posterior = vae.encode(to_model_input(image[None], CPU)).latent_dist
            states = text.encode([held.captions[i]], CPU)[0]
        scale = vae.config.scaling_factor
        mean, std = held.latents[i].float().chunk(2, dim=0)
        torch.testing.assert_close(mean, posterior.mean[0] * scale, rtol=2e-3, atol=2e-4)
        torch.testing.assert_close(std, posterior.std[0] * scale, rtol=2e-3, atol=2e-4)
        torch.testing.assert_close(held.text_states[i].float(), states, rtol=2e-3, atol=2e-3)
        # The raw sample's identity travels with it.
        reader_meta = _sample_json(dataset, held.keys[i])
        assert reader_meta["sha256"] == meta["sha256"] and reader_meta["caption"] == held.captions[i]
    with torch.no_grad():
        empty = text.encode([""], CPU)[0]
    torch.testing.assert_close(held.empty_text.float(), empty, rtol=2e-3, atol=2e-3)


def _sample_json(dataset, key: str) -> dict:
    for shard in dataset.shards:
        reader = ShardReader(shard.uri, seek=(0, 0), first=0)
        for _ in range(shard.samples):
            k, members, _, _ = reader.read()
            if k == key:
                reader.close()
                return json.loads(members["json"])
        reader.close()
    raise AssertionError(f"no sample {key}")


def test_an_interrupted_encode_publishes_nothing_partial_and_a_rerun_keeps_what_it_finished(raw, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(raw, source)
    third = read_dataset(str(source)).shards[2]
    whole = Path(third.uri).read_bytes()
    Path(third.uri).write_bytes(whole[: len(whole) // 2])  # the third raw shard breaks off mid-way
    out = tmp_path / "lat"
    with pytest.raises(DataError, match="truncated|ends before"):
        encode_dataset(tiny(), str(source), str(out), workers=0, batch_size=3)
    # Two complete latent shards, the pinned options, and nothing else: no manifest, no partial tar.
    names = [latent_shard_name(s) for s in read_dataset(str(source)).shards]
    assert sorted(os.listdir(out)) == sorted([PENDING_NAME, *names[:2]])
    with pytest.raises(DataPrepError, match="no manifest.json"):
        read_dataset(str(out))
    for name in names[:2]:
        reader = ShardReader(str(out / name), seek=(0, 0), first=0)
        assert len({reader.read()[0] for _ in range(8)}) == 8
        reader.close()
    before = {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) for name in names[:2]}

    # Another encoder cannot finish it: its shards would mix two encoders' latents.
    with pytest.raises(DataError, match="unfinished encode with other options"):
        encode_dataset(tiny("model.vae.seed=1"), str(source), str(out), workers=0)
    Path(third.uri).write_bytes(whole)
    report = encode_dataset(tiny(), str(source), str(out), workers=0, batch_size=3)
    assert (report.encoded, report.kept, report.samples) == (1, 2, 24)
    assert {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) for name in names[:2]} == before
    assert sorted(os.listdir(out)) == sorted([*names, "manifest.json", "samples.jsonl.gz", EMPTY_TEXT_NAME])
    assert verify_dataset(str(out)).ok


def test_the_loss_from_latents_is_the_pixel_paths_and_never_runs_the_encoders(raw, latents):
    cfg = tiny("train.caption_dropout=0.5")
    parts = build_components(cfg.model, seed=0)
    task = LatentDiffusionTask(cfg, parts, device=CPU)
    pixel_batch = read_split(read_dataset(raw), 0.0, 32, 8, held=False)
    latent_batch = read_split(read_dataset(latents), 0.0, 32, 8, held=False)
    assert latent_batch.keys == pixel_batch.keys and latent_batch.captions == pixel_batch.captions
    kept = kept_captions(8, 0.5, torch.Generator().manual_seed(5))
    assert 0 < int(kept.sum()) < 8  # this seed drops some captions and keeps others: both paths are exercised
    from_pixels = float(task.loss(parts.unet, pixel_batch, torch.Generator().manual_seed(5)).detach())

    def never(*args, **kwargs):
        raise AssertionError("a frozen encoder ran for a latent batch")

    parts.vae.encode, parts.text.encode = never, never
    from_latents = float(task.loss(parts.unet, latent_batch, torch.Generator().manual_seed(5)).detach())
    # Equal up to the latents' and states' fp16 storage.
    assert from_latents == pytest.approx(from_pixels, rel=2e-3)
    other_seed = float(task.loss(parts.unet, latent_batch, torch.Generator().manual_seed(6)).detach())
    assert abs(other_seed - from_pixels) > 10 * abs(from_latents - from_pixels)
    # Validation scores the stored posterior mean and states.
    metrics = task.validate(parts.unet, latent_batch)
    assert set(metrics) >= {"val_loss"} and np.isfinite(metrics["val_loss"])


def test_the_loader_streams_latents_and_resumes_them_exactly(latents):
    def stream(state=None):
        return ShardStream(latents, rank=0, world_size=1, batch_size=4, resolution=32, seed=7, state=state,
                           shuffle_buffer=4)

    first = stream()
    batches = iter(first)
    seen = [next(batches) for _ in range(3)]
    state = first.state.to_dict()
    going_on = [next(batches) for _ in range(4)]  # across the epoch's end (24 samples = 6 batches)
    resumed = iter(stream(type(first.state).from_dict(state)))
    again = [next(resumed) for _ in range(4)]
    assert [b.keys for b in again] == [b.keys for b in going_on]
    assert all(torch.equal(a.latents, b.latents) and torch.equal(a.text_states, b.text_states)
               for a, b in zip(again, going_on))
    epoch = [k for b in seen + going_on[:3] for k in b.keys]
    assert len(set(epoch)) == 24  # one epoch: every sample once
    assert seen[0].latents.dtype == torch.float16 and seen[0].latents.shape == (4, 8, 8, 8)
    assert seen[0].pixels.numel() == 0 and seen[0].empty_text.shape == (32, 384)


def test_training_refuses_latents_of_another_encoder_scale_resolution_or_task(latents, tmp_path, capsys):
    from pipelines.cli import main
    from training.runtime.driver import check_data, check_frozen_latents
    from training.tasks import frozen_hashes_for

    dataset = check_data(tiny(), latents)  # the config that made them: accepted
    check_frozen_latents(dataset, frozen_hashes_for(tiny()))
    refusals = {
        "model.resolution=64": "encoded at 32px but model.resolution is 64",
        "model.vae.scaling_factor=0.5": "scaled by 0.18215 but this config's VAE scales by 0.5",
        "model.text_encoder.max_length=16": "model.text_encoder.max_length=32, this config has 16",
    }
    for override, message in refusals.items():
        with pytest.raises(DataError, match=message):
            check_data(load_config(TINY, [override] if "resolution" in override else [*RESOLUTION, override]),
                       latents)
    with pytest.raises(DataError, match="the `vae` task trains on pixels"):
        check_data(load_config(ROOT / "configs/shapes-vae.yaml", RESOLUTION), latents)
    other = tiny("model.vae.seed=1")
    check_data(other, latents)  # the same shapes and scale: only the weights tell
    with pytest.raises(DataError, match="made by another vae"):
        check_frozen_latents(dataset, frozen_hashes_for(other))
    # Through the CLI: one line, exit 2, before any Ray worker or MLflow run exists.
    code = main(["train", "--config", TINY, "--data", latents, "--set", RESOLUTION[0], "--set", "model.vae.seed=1",
                 "--storage", str(tmp_path / "ray"), "--no-register"])
    err = capsys.readouterr().err.strip().splitlines()  # (transformers' weight-loading bars come before it)
    assert code == 2 and [line for line in err if line.startswith("ldmflow")] == err[-1:], err
    assert "made by another vae" in err[-1] and "re-encode" in err[-1]
