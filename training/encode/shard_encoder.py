"""One raw shard -> one latent shard: decode, encode through the frozen VAE and text encoder, publish.

A latent shard is written in a local staging folder and published whole (storage.put_file: a rename
beside the target locally, one completed upload on S3), so its name never shows a partial tar and a
rerun can trust any shard that exists under its name.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from data_prep import storage
from data_prep.dataset import ShardRef
from data_prep.manifest import ShardInfo
from data_prep.shard_writer import ShardWriter
from training.config import ModelConfig
from training.errors import DataError
from training.loader.batch import Undecodable, decode_sample, to_model_input
from training.loader.latents import LATENT_EXT, TEXT_EXT, npy_bytes
from training.loader.tar_reader import ShardReader
from training.models.assembly import build_frozen, frozen_hashes

log = logging.getLogger(__name__)


@dataclass
class EncodedShard:
    """What encoding one raw shard produced: the latent shard's manifest entry, its samples' records
    (key, source sha256, source id, caption) and the raw samples skipped, by reason."""

    info: ShardInfo
    records: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)


class ShardEncoder:
    """The frozen models of `model` on `device`, and the encoding of whole shards with them. Built once
    per Ray worker (an actor), so a worker loads the models once for all its shards."""

    def __init__(self, model: ModelConfig, *, batch_size: int, device: str = "cpu", expect: dict | None = None,
                 frozen: tuple | None = None):
        """`frozen`: the (vae, text encoder) already built from `model` (in the driver's process), else built here."""
        self.vae, self.text = frozen if frozen is not None else build_frozen(model)
        self.hashes = frozen_hashes(self.vae, self.text)
        if expect is not None and self.hashes != expect:
            # The driver's hashes name the latents; a node with other files under the same path would
            # write latents the manifest misnames.
            raise DataError(f"this worker loads other frozen weights ({self.hashes}) than the driver ({expect}) from "
                            "the same config: the model paths differ between nodes; give every node the same files")
        self.device = torch.device(device)
        self.vae.to(self.device)
        self.text.model.to(self.device)
        self.resolution = model.resolution
        self.batch_size = batch_size
        self.scaling = float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, 3, R, R) -> float16 (B, 2C, h, w): posterior mean and std, times the scaling factor."""
        posterior = self.vae.encode(to_model_input(pixels, self.device)).latent_dist
        return (torch.cat([posterior.mean, posterior.std], dim=1) * self.scaling).to(torch.float16).cpu()

    @torch.no_grad()
    def text_states(self, captions: list[str]) -> torch.Tensor:
        return self.text.encode(captions, self.device).to(torch.float16).cpu()

    def encode_shard(self, shard: ShardRef, out_uri: str) -> EncodedShard:
        """Encode every decodable sample of `shard` into the latent shard `out_uri`, published whole."""
        name = storage.basename(out_uri)
        skipped: dict[str, int] = {}
        records: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="ldm-encode-") as staging:
            def publish(tmp, _name: str) -> None:
                storage.storage_for(out_uri).put_file(str(tmp), out_uri)

            writer = ShardWriter(staging, samples_per_shard=max(1, shard.samples), name_for=lambda n: name,
                                 publish=publish)
            with writer:
                pending: list[tuple[str, torch.Tensor, str, dict]] = []
                for key, members in _samples(shard):
                    try:
                        image, caption = decode_sample({"__key__": key, **members}, self.resolution)
                    except DataError:
                        raise
                    except (Undecodable, OSError, ValueError, SyntaxError) as e:  # PIL's; as the loader does: counted
                        reason = e.reason if isinstance(e, Undecodable) else type(e).__name__
                        skipped[reason] = skipped.get(reason, 0) + 1
                        log.warning("%s: sample %s does not decode (%s); left out", shard.name, key, reason)
                        continue
                    meta = json.loads(members["json"]) if members.get("json") else {}
                    pending.append((key, image, caption, meta))
                    if len(pending) == self.batch_size:
                        records += self._write(writer, pending)
                        pending = []
                if pending:
                    records += self._write(writer, pending)
        if not writer.shards:
            raise DataError(f"{shard.uri}: none of its {shard.samples} samples decodes ({skipped}); "
                            "check it with `ldmflow shard verify`")
        return EncodedShard(info=writer.shards[0], records=records, skipped=skipped)

    def _write(self, writer: ShardWriter, pending: list[tuple[str, torch.Tensor, str, dict]]) -> list[dict]:
        moments = self.moments(torch.stack([p[1] for p in pending]))
        states = self.text_states([p[2] for p in pending])
        records = []
        for (key, _, caption, meta), latent, text in zip(pending, moments.numpy(), states.numpy()):
            meta = {**meta, "caption": caption}
            writer.write({"__key__": key, LATENT_EXT: npy_bytes(np.ascontiguousarray(latent)),
                          TEXT_EXT: npy_bytes(np.ascontiguousarray(text)),
                          "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")})
            records.append({"key": key, "sha256": str(meta.get("sha256", "")),
                            "source_id": str(meta.get("source_id", "")), "caption": caption})
        return records


def _samples(shard: ShardRef):
    """(key, members) of every sample of a raw shard, in order."""
    reader = ShardReader(shard.uri, seek=(0, 0), first=0)
    try:
        for _ in range(shard.samples):
            key, members, _, _ = reader.read()
            yield key, members
    finally:
        reader.close()
