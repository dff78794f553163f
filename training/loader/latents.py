"""Latent shards (DESIGN.md, "Latent shard"): what `ldmflow encode` writes and the loader reads instead of pixels.

A latent dataset is one folder (or s3:// prefix) of tars with a `manifest.json` like a raw part's, plus
the empty caption's text states beside it. Each sample holds:

    {key}.latent.npy   float16 (2C, h, w): the VAE posterior's mean (channels :C) and std (C:), both
                       already multiplied by the scaling factor, so training still draws a fresh
                       sample mean + std * noise each time, as it does from pixels
    {key}.text.npy     float16 (L, D): the frozen text encoder's states of the caption
    {key}.json         the raw sample's metadata (source id, sizes, sha256 of the source bytes) and caption

The manifest's `config.options` (`LatentsInfo`) names what made them: the raw dataset's content id,
the VAE and text encoder (weights sha256 as training.models.assembly.frozen_hashes gives them, path or
preset, the fields that change their output), the scaling factor, resolution, dtype and shapes. The
trainer compares those with its config before it starts (`check_latents_config`, `check_latents_frozen`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep import storage
from data_prep.dataset import Dataset
from training.errors import DataError

KIND = "latents"
"""`kind` of a latent dataset's options (a raw dataset has none)."""
LATENT_EXT = "latent.npy"
TEXT_EXT = "text.npy"
EMPTY_TEXT_NAME = "empty_text.npy"
"""The empty caption's text states (L, D), float16, beside the manifest: what caption dropout conditions on."""
STORED = "mean_std_scaled"
"""What latent.npy holds: posterior mean and std concatenated on the channel axis, times the scaling factor."""
DTYPE = "float16"


@dataclass(frozen=True)
class LatentsInfo:
    """What a latent dataset's manifest says about how it was made (its `config.options`)."""

    source_content_id: str
    """Content id of the raw dataset encoded."""
    resolution: int
    vae: dict[str, Any]
    """sha256 (of the weights), pretrained (path, or null for one built from config), config (model.vae)."""
    text_encoder: dict[str, Any]
    """sha256 (of the weights), name_or_path, max_length, use_attention_mask, tokenizer."""
    scaling_factor: float
    latent_shape: tuple[int, int, int]
    """(2C, h, w) of each latent.npy: mean and std."""
    text_shape: tuple[int, int]
    """(L, D) of each text.npy."""
    empty_text_sha256: str

    @classmethod
    def from_options(cls, options: dict[str, Any], where: str) -> LatentsInfo:
        try:
            if options.get("stored") != STORED or options.get("dtype") != DTYPE:
                raise DataError(f"latents in {where} store {options.get('stored')!r} as {options.get('dtype')!r}; "
                                f"this version reads {STORED!r} as {DTYPE!r}: re-run `ldmflow encode`")
            return cls(source_content_id=str(options["source_content_id"]), resolution=int(options["resolution"]),
                       vae=dict(options["vae"]), text_encoder=dict(options["text_encoder"]),
                       scaling_factor=float(options["scaling_factor"]),
                       latent_shape=tuple(int(n) for n in options["latent_shape"]),  # type: ignore[arg-type]
                       text_shape=tuple(int(n) for n in options["text_shape"]),  # type: ignore[arg-type]
                       empty_text_sha256=str(options["empty_text_sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"the manifest of latents in {where} is missing or mangles {e}; re-run `ldmflow encode`") \
                from None


def latents_info(dataset: Dataset) -> LatentsInfo | None:
    """The dataset's LatentsInfo when it is a latent dataset (`ldmflow encode`), None for raw shards."""
    if dataset.options.get("kind") != KIND:
        return None
    return LatentsInfo.from_options(dataset.options, dataset.uri)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_empty_text(dataset: Dataset, info: LatentsInfo) -> torch.Tensor:
    """The empty caption's states (L, D) stored beside the manifest, checked against its sha256."""
    import hashlib

    uri = storage.join(dataset.uri, EMPTY_TEXT_NAME)
    data = storage.storage_for(uri).read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != info.empty_text_sha256:
        raise DataError(f"{uri} does not match the sha256 in its manifest; re-run `ldmflow encode`")
    return torch.from_numpy(npy_array(data).copy())


def decode_latent_sample(sample: dict, info: LatentsInfo) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(moments float16 (2C, h, w), text states float16 (L, D), caption) of a raw latent sample; DataError
    for arrays of another shape than the manifest says (the shards and manifest disagree)."""
    import json

    arrays = []
    for ext, shape in ((LATENT_EXT, info.latent_shape), (TEXT_EXT, info.text_shape)):
        if ext not in sample:
            raise DataError(f"latent sample {sample['__key__']} has no {ext}; re-run `ldmflow encode`")
        array = npy_array(sample[ext])
        if tuple(array.shape) != tuple(shape) or array.dtype != np.float16:
            raise DataError(f"latent sample {sample['__key__']}: {ext} is {array.dtype} {tuple(array.shape)}, its "
                            f"manifest says {DTYPE} {tuple(shape)}; re-run `ldmflow encode`")
        arrays.append(torch.from_numpy(array.copy()))
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return arrays[0], arrays[1], str(meta.get("caption", ""))


def sample_moments(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents drawn from stored scaled moments (B, 2C, h, w), in fp32: mean + std * noise, the
    noise drawn from `generator` exactly as training.tasks.diffusion_loss.encode_latents draws it, so
    the same generator gives the same latents (up to the fp16 storage) as encoding the pixels."""
    mean, std = moments.float().chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean + std * noise


def check_latents_config(info: LatentsInfo, *, where: str, resolution: int, scaling_factor: float,
                         text_encoder: dict[str, Any], task: str) -> None:
    """Refuse latents this config cannot train on, naming the key and the fix: the `vae` task (it needs
    pixels), another resolution, scaling factor or text encoder setting (max length, mask)."""
    encode = "re-encode with `ldmflow encode --config` this config, or train on the raw shards"
    if task != "ldm":
        raise DataError(f"{where} holds latents (`ldmflow encode`) but the `{task}` task trains on pixels; "
                        "give it the raw shards")
    if info.resolution != resolution:
        raise DataError(f"latents in {where} were encoded at {info.resolution}px but model.resolution is {resolution}; "
                        f"{encode}")
    if not math.isclose(info.scaling_factor, scaling_factor, rel_tol=1e-6):
        raise DataError(f"latents in {where} are scaled by {info.scaling_factor:.6g} but this config's VAE scales by "
                        f"{scaling_factor:.6g} (model.vae.scaling_factor); {encode}")
    for key in ("name_or_path", "max_length", "use_attention_mask", "tokenizer"):
        if info.text_encoder.get(key) != text_encoder.get(key):
            raise DataError(f"latents in {where} were encoded with model.text_encoder.{key}="
                            f"{info.text_encoder.get(key)!r}, this config has {text_encoder.get(key)!r}; {encode}")


def check_latents_frozen(info: LatentsInfo, frozen: dict[str, str], *, where: str) -> None:
    """Refuse latents made by other VAE or text encoder weights than the config loads (`frozen`:
    training.models.assembly.frozen_hashes of them)."""
    for name, made in (("vae", info.vae), ("text_encoder", info.text_encoder)):
        if made.get("sha256") != frozen.get(name):
            source = made.get("pretrained" if name == "vae" else "name_or_path") or "built from config"
            raise DataError(f"latents in {where} were made by another {name} (weights sha256 "
                            f"{str(made.get('sha256'))[:12]}, {source}) than this config loads "
                            f"({str(frozen.get(name))[:12]}); re-encode with `ldmflow encode --config` this config, "
                            "or train on the raw shards")
