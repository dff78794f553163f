"""Making a kept checkpoint reachable from its MLflow run.

Checkpoints live in the run's storage (a shared path or s3://), which a registry consumer often
cannot reach: a path on the training cluster, a bucket it has no credentials for. So the final
verified checkpoint is also logged to the run as artifacts, under ``checkpoints/step-<N>/``, and
the run is tagged with where (``checkpoint.final.artifacts``, a runs:/ URI, and
``checkpoint.final.step``). Through the tracking server's artifact proxy, anyone who can read the
run can fetch it, with no storage credentials.

What is logged, and why: the model, not the optimizer. ``COMMITTED``, ``train_state.json`` (step,
resolved config, frozen-weight hashes), every rank's file list, and the weights an export reads:
the EMA (``ema.safetensors``) and the weights the workers gathered at the final step
(``unet.safetensors``, or ``vae.safetensors`` for a `vae` run). DeepSpeed's optimizer and partition
files (several times the model's size, and only useful to resume training on the cluster that
already has them in storage) stay in storage only. The logged folder is still a checkpoint the
project's own readers accept: ``read_state`` with the same file filter verifies it, and
``training.mlops.export.build_pipeline`` exports it, because the lists and the marker are logged
unchanged and the reader checks only the files it is asked to.

A checkpoint without gathered or EMA weights (an intermediate one, or one written before the final
gather existed) is not logged: its model exists only inside DeepSpeed's shards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from training.checkpoint.layout import COMMITTED, EMA_FILE, FILES_DIR, STATE_FILE, UNET_FILE, VAE_FILE
from training.checkpoint.run_storage import download_checkpoint
from training.checkpoint.verify import checkpoint_ref, read_state

log = logging.getLogger(__name__)

ARTIFACT_DIR = "checkpoints"
WEIGHT_FILES = (EMA_FILE, UNET_FILE, VAE_FILE)
ARTIFACTS_TAG = "checkpoint.final.artifacts"
STEP_TAG = "checkpoint.final.step"


@dataclass(frozen=True)
class LoggedCheckpoint:
    step: int
    artifact_path: str
    """Inside the run, e.g. checkpoints/step-150."""
    uri: str
    """runs:/RUN_ID/checkpoints/step-150: what mlflow.artifacts.download_artifacts takes."""
    files: tuple[str, ...]
    """The checkpoint files logged (relative POSIX paths)."""


def _kept(rel: str) -> bool:
    return rel in (COMMITTED, STATE_FILE, *WEIGHT_FILES) or rel.startswith(FILES_DIR + "/")


def log_checkpoint(run_id: str, checkpoint: str) -> LoggedCheckpoint | None:
    """Log the model files of the checkpoint at `checkpoint` (local path or s3://) to run `run_id`
    under checkpoints/step-<N>/, after verifying their sha256 against the checkpoint's own lists, and
    tag the run with where they are. Logging the same checkpoint again rewrites the same files.
    None, with a warning, for a checkpoint that holds no gathered or EMA weights; CheckpointError
    when it is not committed or fails verification."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="ldm-ckpt-log-") as tmp:
        staged = _stage(checkpoint, Path(tmp) / "checkpoint")
        files = tuple(sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()))
        if not set(files) & set(WEIGHT_FILES):
            log.warning("checkpoint %s is not logged to run %s: it has no gathered or EMA weights (%s), so its "
                        "model exists only in DeepSpeed's shards, which stay in storage", checkpoint, run_id,
                        ", ".join(WEIGHT_FILES))
            return None
        # What is uploaded is what the checkpoint's lists vouch for, byte for byte.
        state = read_state(staged, verify_hashes=True, only=lambda rel: rel in WEIGHT_FILES)
        artifact_path = f"{ARTIFACT_DIR}/step-{state.step}"
        client = MlflowClient()
        # The client, not mlflow.start_run: reopening a finished run would change its status.
        client.log_artifacts(run_id, str(staged), artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}"
    client.set_tag(run_id, ARTIFACTS_TAG, uri)
    client.set_tag(run_id, STEP_TAG, str(state.step))
    log.info("checkpoint %s (step %d) logged to run %s as %s", checkpoint, state.step, run_id, uri)
    return LoggedCheckpoint(step=state.step, artifact_path=artifact_path, uri=uri, files=files)


def _stage(checkpoint: str, out: Path) -> Path:
    """The kept files of `checkpoint` in `out`: downloaded from S3, or linked (copied across
    filesystems) from a local folder, which download_checkpoint returns whole and in place."""
    if storage.is_s3(checkpoint):
        return download_checkpoint(checkpoint, out, only=_kept)
    source = download_checkpoint(checkpoint, out)
    for rel in checkpoint_ref(source).files:
        if not _kept(rel):
            continue
        target = out.joinpath(*rel.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / rel, target)
        except OSError:
            shutil.copyfile(source / rel, target)
    return out
