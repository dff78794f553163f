"""`encode_dataset`: a raw dataset -> its latent dataset, one latent shard per raw shard, on Ray workers.

Resumable: each latent shard appears only when complete (shard_encoder), so a rerun after a crash
encodes only the raw shards whose latent shard is not there. What the finished shards were made
with is pinned by `encoding.json`, written before the first shard: a rerun with other options (another
VAE, text encoder, resolution, raw dataset) is refused rather than mixing latents of two encoders. The
manifest is written last; until then readers see no dataset at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from data_prep import storage
from data_prep.dataset import Dataset, SampleRecord, ShardRef, read_dataset, write_samples
from data_prep.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, ShardInfo, read_manifest, write_manifest
from training.config import RunConfig
from training.errors import ConfigError, DataError
from training.loader.latents import DTYPE, EMPTY_TEXT_NAME, KIND, STORED, latents_info, npy_bytes
from training.models.assembly import vae_downsample_factor

log = logging.getLogger(__name__)

PENDING_NAME = "encoding.json"
"""The options an unfinished encode writes with (removed once the manifest is written)."""


@dataclass
class EncodeReport:
    out: str
    shards: int
    samples: int
    encoded: int
    """Latent shards written by this run."""
    kept: int
    """Latent shards a previous, interrupted run had completed (not encoded again)."""
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    content_id: str = ""

    def table(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"  shards      {self.shards} ({self.encoded} encoded now, {self.kept} kept from an earlier run)",
            f"  samples     {self.samples}",
            f"  skipped     {json.dumps(self.skipped) if self.skipped else 'none'}",
            f"  seconds     {self.seconds:.1f} ({rate:.1f} samples/s over the whole run)",
            f"  content id  {self.content_id[:16]}",
        ])


def encoding_id(cfg: RunConfig, source_content_id: str, frozen: dict[str, str]) -> str:
    """The identity of the latents `cfg` makes of the raw dataset `source_content_id`: that content id,
    the frozen weights' sha256 (`frozen`: training.models.assembly.frozen_hashes) and every config field
    that changes what the encoders write (the same fields encode_dataset pins in its manifest). Two
    encodes with one id write the same latents; a flow keeps them under `<latents_dir>/<id[:16]>` and
    caches its encode step on it (pipelines.tasks.encode_task), never on a path."""
    model = cfg.to_dict()["model"]
    blob = json.dumps({"kind": KIND, "source_content_id": source_content_id, "frozen": frozen,
                       "resolution": model["resolution"], "vae": model["vae"], "text_encoder": model["text_encoder"],
                       "stored": STORED, "dtype": DTYPE}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def latent_shard_name(shard: ShardRef) -> str:
    """The latent shard of a raw shard: its path in the raw dataset, flattened (part--shard.tar)."""
    return shard.name.replace("/", "--")


def encode_dataset(cfg: RunConfig, data: str, out: str, *, workers: int | None = None,
                   batch_size: int = 64) -> EncodeReport:
    """Encode the raw dataset at `data` (local or s3://) into a latent dataset at `out` with `cfg.model`'s
    frozen VAE and text encoder. `workers` Ray workers (None: train.num_workers; 0: in this process, for
    tests and debugging), on RAY_ADDRESS's cluster or a local Ray."""
    from training.models.assembly import build_frozen, frozen_hashes

    started = time.perf_counter()
    if cfg.task != "ldm":
        raise ConfigError(f"config `{cfg.name}` is a `{cfg.task}` config; encode with the `ldm` config that will train "
                          "on the latents (its model.vae and model.text_encoder)")
    if batch_size < 1:
        raise ConfigError(f"encode batch size must be >= 1, got {batch_size}")
    workers = cfg.train.num_workers if workers is None else workers
    if workers < 0:
        raise ConfigError(f"encode workers must be >= 0, got {workers}")
    data, out = storage.absolute(data), storage.absolute(out)
    storage.storage_for(data).check_readable(data)
    raw = read_dataset(data)
    if latents_info(raw) is not None:
        raise DataError(f"{data} already holds latents; encode the raw shards they were made from")
    if raw.resolution is not None and raw.resolution != cfg.model.resolution:
        raise DataError(f"shards in {data} are {raw.resolution}px but model.resolution is {cfg.model.resolution}; "
                        f"re-shard with --resolution {cfg.model.resolution} or set model.resolution={raw.resolution}")
    storage.storage_for(out).check_writable(out)

    # The driver's own copy of the frozen models names the latents (and, in each worker, is checked against).
    vae, text = build_frozen(cfg.model)
    hashes = frozen_hashes(vae, text)
    with torch.no_grad():
        empty = text.encode([""], "cpu")[0].to(torch.float16).numpy()
    empty_bytes = npy_bytes(empty)
    side = cfg.model.resolution // vae_downsample_factor(vae)
    te = cfg.model.text_encoder
    options = {
        "kind": KIND,
        "source_content_id": raw.content_id,
        "resolution": cfg.model.resolution,
        "vae": {"sha256": hashes["vae"], "pretrained": cfg.model.vae.pretrained,
                "config": cfg.to_dict()["model"]["vae"]},
        "text_encoder": {"sha256": hashes["text_encoder"], "name_or_path": te.name_or_path,
                         "max_length": te.max_length, "use_attention_mask": te.use_attention_mask,
                         "tokenizer": te.tokenizer},
        "scaling_factor": float(vae.config.scaling_factor),
        "stored": STORED,
        "dtype": DTYPE,
        "latent_shape": [2 * int(vae.config.latent_channels), side, side],
        "text_shape": [int(d) for d in empty.shape],
        "empty_text_sha256": hashlib.sha256(empty_bytes).hexdigest(),
    }

    plan = [(shard, storage.join(out, latent_shard_name(shard))) for shard in raw.shards if shard.samples > 0]
    done = _finished(out, options, raw, len(plan))
    if done is not None:
        log.info("%s already holds these latents (manifest written); nothing to encode", out)
        return done
    _pin_options(out, options)
    store = storage.storage_for(out)
    todo = [(shard, uri) for shard, uri in plan if not store.exists(uri)]
    kept = len(plan) - len(todo)
    if kept:
        log.info("%d of %d latent shards are complete from an earlier run; encoding the other %d", kept, len(plan),
                 len(todo))
    results = _run(cfg, todo, hashes, workers=workers, batch_size=batch_size, frozen=(vae, text))
    del vae, text
    by_uri = {uri: r for (_, uri), r in zip(todo, results)}
    infos: list[ShardInfo] = []
    records: list[SampleRecord] = []
    skipped: dict[str, int] = {}
    for shard, uri in plan:
        if uri in by_uri:
            info, samples, shard_skipped = by_uri[uri].info, by_uri[uri].records, by_uri[uri].skipped
        else:
            info, samples = describe_shard(uri)
            shard_skipped = {"undecodable": shard.samples - info.samples} if shard.samples > info.samples else {}
        infos.append(info)
        records += [SampleRecord(key=r["key"], sha256=r["sha256"], source_id=r["source_id"], shard=info.name,
                                 caption=r["caption"]) for r in samples]
        for reason, n in shard_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n

    # Everything the manifest promises is durable before it is written: the shards, the samples list,
    # the empty caption's states.
    storage.put_bytes(storage.join(out, EMPTY_TEXT_NAME), empty_bytes)
    samples_name, samples_sha = write_samples(out, records)
    seconds = time.perf_counter() - started
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, shards=infos, total_samples=sum(i.samples for i in infos),
        total_bytes=sum(i.bytes for i in infos), skipped=skipped,
        config={"kind": KIND, "source": data, "preset": cfg.name, "options": options, "files": [EMPTY_TEXT_NAME]},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        stats={"encoded_shards": len(todo), "kept_shards": kept, "seconds": round(seconds, 3), "workers": workers},
        content_sum=raw.content_sum, samples_file=samples_name, samples_sha256=samples_sha,
    )
    write_manifest(out, manifest)
    store.delete(storage.join(out, PENDING_NAME))
    dataset = read_dataset(out)
    return EncodeReport(out=out, shards=len(infos), samples=manifest.total_samples, encoded=len(todo), kept=kept,
                        skipped=skipped, seconds=seconds, content_id=dataset.content_id)


def _finished(out: str, options: dict, raw: Dataset, shards: int) -> EncodeReport | None:
    """The report of an encode of these options already published at `out`; None when there is none.
    Other latents, or anything else with a manifest, there are refused."""
    if not storage.storage_for(out).exists(storage.join(out, MANIFEST_NAME)):
        return None
    manifest = read_manifest(out)
    if manifest.config.get("options") != options or len(manifest.shards) != shards:
        raise DataError(f"{out} already holds a dataset other than these latents of {raw.uri} (another encoder, "
                        "config or raw dataset, or raw shards); encode to another --out or delete it first")
    return EncodeReport(out=out, shards=len(manifest.shards), samples=manifest.total_samples, encoded=0,
                        kept=len(manifest.shards), skipped=dict(manifest.skipped),
                        content_id=read_dataset(out).content_id)


def _pin_options(out: str, options: dict) -> None:
    """Record the options of this encode before any shard, or refuse ones that differ from those of the
    unfinished encode whose shards are already there."""
    uri = storage.join(out, PENDING_NAME)
    store = storage.storage_for(uri)
    if store.exists(uri):
        pinned = json.loads(store.read_bytes(uri).decode("utf-8"))
        if pinned != options:
            raise DataError(f"{out} holds the shards of an unfinished encode with other options ({uri}: another "
                            "encoder, config or raw dataset); rerun that encode, encode to another --out, or delete "
                            f"{out} first")
        return
    store.put_bytes(uri, (json.dumps(options, sort_keys=True, indent=2) + "\n").encode("utf-8"))


def describe_shard(uri: str) -> tuple[ShardInfo, list[dict]]:
    """The manifest entry and sample records of a latent shard an earlier run completed: read once,
    hashed, its tar listed (the records come from each sample's json)."""
    data = storage.storage_for(uri).read_bytes(uri)
    records: list[dict] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    records.append({"key": member.name[:-len(".json")], "sha256": str(meta.get("sha256", "")),
                                    "source_id": str(meta.get("source_id", "")),
                                    "caption": str(meta.get("caption", ""))})
    except (tarfile.TarError, ValueError) as e:
        # Published whole, so only an outside hand leaves a bad one under its name.
        raise DataError(f"{uri} is not a readable latent shard ({e}); delete it and rerun `ldmflow encode`") from e
    info = ShardInfo(name=storage.basename(uri), samples=len(records), bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())
    return info, records


def _run(cfg: RunConfig, todo: list[tuple[ShardRef, str]], hashes: dict, *, workers: int, batch_size: int,
         frozen: tuple) -> list:
    """EncodedShard of each (raw shard, latent shard URI) of `todo`, in order; with no workers, in this
    process with the driver's `frozen` (vae, text encoder)."""
    from training.encode.shard_encoder import ShardEncoder

    if not todo:
        return []
    if workers == 0:
        encoder = ShardEncoder(cfg.model, batch_size=batch_size, expect=hashes, frozen=frozen)
        return [encoder.encode_shard(shard, uri) for shard, uri in todo]
    import ray
    from ray.util import ActorPool

    _ensure_ray(workers)
    device = "cuda" if cfg.train.use_gpu else "cpu"
    actor = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(ShardEncoder)
    actors = [actor.remote(cfg.model, batch_size=batch_size, device=device, expect=hashes)
              for _ in range(min(workers, len(todo)))]
    try:
        pool = ActorPool(actors)
        # Ordered map: a worker's failure is raised here, after the shards before it are published.
        return list(pool.map(lambda a, job: a.encode_shard.remote(*job), todo))
    finally:
        for a in actors:
            ray.kill(a)


def _ensure_ray(workers: int) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray with a CPU for each worker (as training does)."""
    import ray

    if ray.is_initialized():
        return
    env = storage.env_for_workers()  # endpoint and region; the nodes bring their own credentials
    runtime_env: dict = {"worker_process_setup_hook": "training.quiet.quiet_ray_internals"}
    if env:
        runtime_env["env_vars"] = env
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, workers + 1), include_dashboard=False, runtime_env=runtime_env)
