"""Latents made by other text-encoder weights under the same name: the case only the weights' hash can tell.

The manifest's text-encoder settings (name_or_path, max_length, mask, tokenizer) are what check_data
compares; a folder whose weights were replaced after the encode (a fine-tuned encoder saved over the old
one, the same architecture) matches every one of them. Training must still refuse those latents, in one
line, before any Ray worker or MLflow run exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_prep.dataset import read_dataset
from data_prep.shard import ShardConfig, build_shards
from data_prep.synth import generate_synthetic
from training.config import load_config
from training.encode.job import encode_dataset
from training.errors import DataError
from training.loader.latents import latents_info
from training.models.text_encoder import resolve_encoder_path

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs/tiny.yaml")


def test_training_refuses_latents_of_other_text_encoder_weights_under_the_same_path(tmp_path, capsys):
    from transformers import AutoModel

    from pipelines.cli import main
    from training.runtime.driver import check_data, check_frozen_latents
    from training.tasks import frozen_hashes_for

    generate_synthetic(tmp_path / "images", 8, seed=5, image_size=32)
    raw = str(tmp_path / "shards")
    build_shards(ShardConfig(source=str(tmp_path / "images"), output=raw, resolution=32, samples_per_shard=8,
                             progress=False))
    encoder = tmp_path / "text-encoder"  # a copy of the offline MiniLM: its own folder, weights and all
    shutil.copytree(resolve_encoder_path("builtin:minilm-l6"), encoder)
    overrides = ["model.resolution=32", f"model.text_encoder.name_or_path={encoder}"]
    cfg = load_config(TINY, overrides)
    latents = str(tmp_path / "latents")
    encode_dataset(cfg, raw, latents, workers=0, batch_size=8)
    made_with = frozen_hashes_for(cfg)
    assert latents_info(read_dataset(latents)).text_encoder["sha256"] == made_with["text_encoder"]

    # Other weights, same architecture, saved over the folder the latents name.
    model = AutoModel.from_pretrained(encoder)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.mul_(1.01)
    model.save_pretrained(encoder)
    now = frozen_hashes_for(cfg)
    assert now["text_encoder"] != made_with["text_encoder"] and now["vae"] == made_with["vae"]

    dataset = check_data(cfg, latents)  # every setting the manifest records still matches...
    with pytest.raises(DataError, match="made by another text_encoder") as refused:
        check_frozen_latents(dataset, now)  # ...the weights do not
    assert made_with["text_encoder"][:12] in str(refused.value) and now["text_encoder"][:12] in str(refused.value)

    # Through the CLI: one line, exit 2, before training starts.
    code = main(["train", "--config", TINY, "--data", latents, *[a for o in overrides for a in ("--set", o)],
                 "--storage", str(tmp_path / "ray"), "--no-register"])
    err = capsys.readouterr().err.strip().splitlines()  # (transformers' weight-loading bars come before it)
    assert code == 2 and [line for line in err if line.startswith("ldmflow")] == err[-1:], err
    assert "made by another text_encoder" in err[-1] and "re-encode" in err[-1]
