"""From a committed training checkpoint to a diffusers pipeline folder.

The folder is what consumers load: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/
model_index.json`` with safetensors weights, readable by ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from data_prep import storage
from training.checkpoint.layout import COMMITTED, EMA_FILE, FILES_DIR, STATE_FILE, UNET_FILE, VAE_FILE, CheckpointError
from training.checkpoint.loading import consolidated_weights, load_ema, load_unet_weights, stage0_weights
from training.checkpoint.run_storage import download_checkpoint
from training.checkpoint.verify import listed_files, read_state
from training.config import RunConfig, config_from_dict
from training.models.assembly import build_components, frozen_hashes, new_vae
from training.models.noise import sampling_scheduler
from training.models.sampling import DEFAULTS_FILE, LIMITS_FILE, RequestLimits, SamplerDefaults
from training.tasks.vae import AutoencoderObjective

log = logging.getLogger(__name__)


EXPORT_FILES = (COMMITTED, STATE_FILE, FILES_DIR + "/", EMA_FILE, UNET_FILE, VAE_FILE)
"""What an export reads from a final checkpoint; DeepSpeed's optimizer shards only when neither
weights file is there."""


def fetch_for_export(uri: str, local_dir: Path) -> Path:
    """The checkpoint at `uri` (local path or s3://) as a local folder the export can read: a local
    checkpoint as it is; from S3 its markers, file lists and UNet/VAE/EMA weights, and DeepSpeed's
    partitions only for a checkpoint that has neither weights file (a stage-0 model file or the
    optimizer shards to consolidate)."""

    def exported(rel: str) -> bool:
        return rel in (COMMITTED, STATE_FILE, EMA_FILE, UNET_FILE, VAE_FILE) or rel.startswith(FILES_DIR + "/")

    local = download_checkpoint(uri, Path(local_dir), only=exported)
    listed = {rel for rank in range(read_state(local, only=exported).world_size) for rel in listed_files(local, rank)}
    if listed & {EMA_FILE, UNET_FILE, VAE_FILE}:
        return local
    return download_checkpoint(uri, Path(local_dir))


def load_trained_unet(checkpoint_dir: Path, cfg: RunConfig, unet: torch.nn.Module, *, use_ema: bool,
                      weights_file: str = UNET_FILE) -> str:
    """Load the checkpoint's trained weights into `unet` (the task's trained module: the UNet, or the
    VAE task's AutoencoderObjective); returns which weights were used: "ema" (rank 0's EMA),
    "gathered" (`weights_file`, the full module the workers gathered at the final step) or
    "deepspeed" (older or intermediate checkpoints: DeepSpeed's partitions consolidated here)."""
    state = read_state(checkpoint_dir, verify_hashes=True,
                       only=_weights_needed(checkpoint_dir, use_ema, weights_file))
    if use_ema and (checkpoint_dir / EMA_FILE).is_file():
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.train.ema.decay)
        load_ema(checkpoint_dir, ema)
        ema.copy_to(unet.parameters())
        return "ema"
    if weights_file in listed_files(checkpoint_dir, 0):  # listed, so read_state checked its sha256
        # Training dtype (bf16/fp16/fp32); load_state_dict upcasts into the fp32 export UNet.
        _load_exact(unet, load_unet_weights(checkpoint_dir, weights_file))
        return "gathered"
    if cfg.train.zero_stage == 0:
        # Stage 0 partitions nothing and writes no ZeRO optimizer shards to consolidate; the model
        # file holds the full UNet in the training dtype.
        _load_exact(unet, stage0_weights(checkpoint_dir, state.tag))
        return "deepspeed"
    # Consolidates any ZeRO stage's partitioned fp32 master weights into one state dict on this
    # machine: the whole optimizer state passes through memory, so only for checkpoints without
    # the gathered file.
    _load_exact(unet, consolidated_weights(checkpoint_dir, state.tag))
    return "deepspeed"


def _weights_needed(checkpoint_dir: Path, use_ema: bool, weights_file: str = UNET_FILE):
    """Which listed files load_trained_unet needs present: the EMA or gathered weights when the
    checkpoint has them (an export fetched from S3 has only those), else everything."""
    lists = list((Path(checkpoint_dir) / FILES_DIR).glob("rank-*.json"))
    listed = {rel for path in lists for rel in json.loads(path.read_text())["files"]}
    if use_ema and EMA_FILE in listed:
        return lambda rel: rel == EMA_FILE
    if weights_file in listed:
        return lambda rel: rel == weights_file
    return None


def _load_exact(unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint UNet does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def build_pipeline(checkpoint_dir: Path, *, use_ema: bool = True) -> tuple[StableDiffusionPipeline, RunConfig]:
    """Rebuild the components from the checkpoint's own config and load the trained UNet."""
    state = read_state(checkpoint_dir, only=_weights_needed(checkpoint_dir, use_ema))
    if "num_attention_heads" not in state.config.get("model", {}).get("unet", {}):
        # Before that key existed, unet.attention_head_dim held diffusers' head *count*; read with
        # today's meaning (head width) it would build a different model that still loads the weights.
        raise CheckpointError(f"checkpoint {checkpoint_dir} was written by an older ldmflow whose UNet config "
                              "meant another thing by attention_head_dim; export it with that version")
    cfg = config_from_dict(state.config)
    if cfg.task != "ldm":
        raise CheckpointError(f"checkpoint {checkpoint_dir} is of a `{cfg.task}` run: export it with export_vae")
    parts = build_components(cfg.model, seed=cfg.train.seed)
    frozen = frozen_hashes(parts.vae, parts.text)
    if state.frozen and frozen != state.frozen:
        raise RuntimeError(
            f"the VAE/text encoder loaded now differ from those the checkpoint {checkpoint_dir} was trained with"
        )
    source = load_trained_unet(checkpoint_dir, cfg, parts.unet, use_ema=use_ema and cfg.train.ema.enabled)
    log.info("exporting UNet weights from %s (step %d)", source, state.step)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text.model,
        tokenizer=parts.text.tokenizer,
        unet=parts.unet.eval(),
        scheduler=sampling_scheduler(parts.noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: Path, defaults: SamplerDefaults | None = None,
                  limits: RequestLimits | None = None) -> Path:
    """Write the pipeline folder atomically: a half-written folder never sits at `out_dir`. The folder
    records `defaults` (sampler, steps, guidance; SamplerDefaults() when None) in sampler_defaults.json,
    which the pyfunc model and its signature use for requests that do not name them, and `limits`
    (RequestLimits() when None) in serving_limits.json, which the pyfunc enforces on every request."""
    with storage.temporary_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_defaults(tmp, defaults or SamplerDefaults())
        write_limits(tmp, limits or RequestLimits())
    return Path(out_dir)


def write_limits(pipeline_dir: str | Path, limits: RequestLimits) -> Path:
    """Record `limits` in the pipeline folder (training.models.sampling.read_limits reads them)."""
    path = Path(pipeline_dir) / LIMITS_FILE
    storage.put_bytes(path, (json.dumps(asdict(limits), indent=2, sort_keys=True) + "\n").encode())
    return path


def request_limits(cfg: RunConfig) -> RequestLimits:
    """The run config's `serving` section as the limits its exported model enforces."""
    s = cfg.serving
    return RequestLimits(max_prompts=s.max_prompts, max_batch=s.max_batch, max_steps=s.max_steps,
                         min_guidance=s.min_guidance, max_guidance=s.max_guidance,
                         max_image_size=s.max_image_size)


def write_defaults(pipeline_dir: str | Path, defaults: SamplerDefaults) -> Path:
    """Record `defaults` in the pipeline folder (training.models.sampling.read_defaults reads them)."""
    path = Path(pipeline_dir) / DEFAULTS_FILE
    storage.put_bytes(path, (json.dumps(asdict(defaults), indent=2, sort_keys=True) + "\n").encode())
    return path


def export_vae(checkpoint_dir: Path, *, use_ema: bool = True):
    """The AutoencoderKL of a `train-vae` checkpoint (its EMA weights when it kept them), in eval mode,
    and the run's config. Its scaling_factor is still the config's: see latent_scaling_factor."""

    state = read_state(checkpoint_dir, only=_weights_needed(checkpoint_dir, use_ema, VAE_FILE))
    cfg = config_from_dict(state.config)
    if cfg.task != "vae":
        raise CheckpointError(f"checkpoint {checkpoint_dir} is of a `{cfg.task}` run, not a `train-vae` one")
    module = AutoencoderObjective(new_vae(cfg.model.vae, resolution=cfg.model.resolution, seed=cfg.train.seed))
    source = load_trained_unet(checkpoint_dir, cfg, module, use_ema=use_ema and cfg.train.ema.enabled,
                               weights_file=VAE_FILE)
    log.info("exporting VAE weights from %s (step %d)", source, state.step)
    vae = module.vae.eval().requires_grad_(False)
    return vae, cfg


@torch.no_grad()
def latent_scaling_factor(vae, pixels: torch.Tensor, *, seed: int = 0, batch: int = 64) -> float:
    """1 / std of the latents `vae` samples for `pixels` (in [-1, 1]): the factor that gives the
    diffusion model unit-variance latents (SD's 0.18215 was computed the same way for its VAE)."""
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[start:start + batch].float()).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        latents.append(posterior.mean + posterior.std * noise)
    return float(1.0 / torch.cat(latents).float().std())


def save_vae(vae, out_dir: Path) -> Path:
    """A diffusers AutoencoderKL folder (config.json + safetensors), written atomically."""
    with storage.temporary_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
