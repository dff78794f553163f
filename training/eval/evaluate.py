"""Evaluating a model on the shapes task: generate for held-out prompts (combinations no training shard
holds: compositional generalisation) and for seen ones (training combinations), score caption adherence
on each (training.eval.shapes) and the fixed-timestep held-out loss, record the results in MLflow.

An evaluation names the set it was scored on (`Evaluation.eval_set_id`: the prompts, images per prompt,
seed and sampler settings), so a gate compares two models only on the same set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import storage
from data_prep.dataset import read_dataset
from data_prep.image_ops import encode_image
from data_prep.synth import COLOURS, SHAPES
from training.config import config_from_dict
from training.errors import EvaluationError
from training.eval.shapes import (ATTRIBUTES, Classified, Prompt, classify, heldout_prompts, score_classified,
                                  seen_prompts)
from training.loader.batch import read_split
from training.locations import runs_dir, setup_mlflow
from training.mlops.generate import request_params
from training.mlops.pyfunc_model import PIPELINE_ARTIFACT, TextToImageModel, load_pipeline
from training.mlops.tracking import CONFIG_ARTIFACT
from training.models.assembly import Components
from training.models.folders import fetch_mlflow_folder
from training.models.noise import build_noise_scheduler
from training.models.sampling import image_grid
from training.models.text_encoder import TextEncoder
from training.tasks.ldm import LatentDiffusionTask

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One evaluation of a model: what was asked, what came back, how it scored."""

    model_uri: str
    """The URI evaluated; a models:/ alias is pinned to the version it pointed at."""
    prompts: list[Prompt]
    """The held-out prompts (synth's HELDOUT_COMBINATIONS, never trained on), each asked `per_prompt` times."""
    per_prompt: int
    """Images per prompt."""
    params: dict
    """The request: sampler, steps, guidance and seed (image j of `images` started from seed + j)."""
    images: np.ndarray
    """(len(all_prompts) * per_prompt, H, W, 3) uint8; all_prompts[p]'s images are p * per_prompt onwards:
    the held-out prompts' first, then the seen ones'."""
    classified: list[Classified]
    """What `classify` read in each image."""
    metrics: dict[str, float]
    """On the held-out prompts: colour_adherence, shape_adherence, background_adherence (fractions of
    images) and n (images); on the seen prompts the same with a seen_ prefix."""
    seen_prompts: list[Prompt] = field(default_factory=list)
    """Prompts of combinations the training set holds, each asked `per_prompt` times."""
    eval_set_id: str = ""
    """What the scores were measured on: a hash of the prompts, per_prompt, seed, sampler, steps and
    guidance. Two evaluations compare only when their ids are equal."""
    run_id: str | None = None
    """The MLflow run that logged the model (models:/ and runs:/ URIs): where results are recorded."""
    model_name: str | None = None
    model_version: str | None = None
    """The registered model version evaluated (models:/ URIs), whose tags get the results."""
    grid_path: Path | None = field(default=None, repr=False)
    """Where save_results wrote the grid of images (a row per prompt)."""

    @property
    def all_prompts(self) -> list[Prompt]:
        """The held-out prompts, then the seen ones: the order of `images`."""
        return [*self.prompts, *self.seen_prompts]

    @property
    def expected(self) -> list[Prompt]:
        """The prompt of each image."""
        return [p for p in self.all_prompts for _ in range(self.per_prompt)]

    def grid(self) -> np.ndarray:

        return image_grid(self.images, columns=self.per_prompt)

    def results(self) -> dict:
        """Everything but the pixels, as JSON: settings, scores, and what each image was read as."""
        held = len(self.prompts) * self.per_prompt
        return {
            "model_uri": self.model_uri, "per_prompt": self.per_prompt, "params": self.params,
            "eval_set_id": self.eval_set_id, "metrics": self.metrics,
            "images": [{"prompt": p.caption, "set": "held-out" if i < held else "seen", "expected": asdict(p),
                        "classified": asdict(c)}
                       for i, (p, c) in enumerate(zip(self.expected, self.classified))],
        }

    def table(self) -> str:
        p = self.params
        lines = [f"{self.model_uri}: {len(self.prompts)} prompts x {self.per_prompt} images, sampler "
                 f"{p.get('sampler', '?')}, {p.get('steps', '?')} steps, guidance {p.get('guidance', '?')}, "
                 f"seed {p['seed']}",
                 f"held-out: {len(self.prompts)} combinations never trained on; seen: {len(self.seen_prompts)} "
                 f"training combinations; evaluation set {self.eval_set_id}",
                 f"{'adherence':<12}{'held-out':>10}{'seen':>8}{'chance':>8}"]
        chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "background": 1 / len(COLOURS)}
        for a in ATTRIBUTES:
            seen = self.metrics.get(f"seen_{a}_adherence")
            lines.append(f"{a:<12}{self.metrics[f'{a}_adherence']:>10.3f}"
                         f"{'-' if seen is None else f'{seen:.3f}':>8}{chance[a]:>8.2f}")
        if "val_loss" in self.metrics:
            lines.append(f"held-out loss at fixed timesteps: {self.metrics['val_loss']:.4f}")
        return "\n".join(lines)


def evaluate_model(model_uri: str, *, prompts: int = 12, seen: int | None = None, per_prompt: int = 4,
                   steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                   seed: int = 0, batch_size: int = 32) -> Evaluation:
    """Generate `per_prompt` images for each of `prompts` held-out prompts (heldout_prompts(prompts,
    seed=seed)) and of `seen` (default: as many) seen prompts (seen_prompts(seen, seed=seed)) with the
    model at `model_uri`, and score each set. The model is a models:/ or runs:/ URI (loaded as its
    MLflow pyfunc) or a local pipeline folder. Requests of up to `batch_size` images; image j starts
    from the noise of seed + j whatever the batching, so a model and a seed give the same images.
    Steps, guidance and sampler left None take the model's recorded defaults."""

    if per_prompt < 1 or batch_size < 1:
        raise EvaluationError(f"per_prompt and batch_size must be >= 1, got {per_prompt} and {batch_size}")
    held = heldout_prompts(prompts, seed=seed)
    familiar = seen_prompts(prompts if seen is None else seen, seed=seed)
    source = _resolve(model_uri)
    predict, defaults, max_prompts = _load(source.uri)
    # The model refuses a request over its serving limit (serving.max_prompts), so ask for no more.
    batch_size = min(batch_size, max_prompts or batch_size)
    expected = [p for p in [*held, *familiar] for _ in range(per_prompt)]
    captions = [p.caption for p in expected]
    params = request_params(seed=seed, sampler=sampler, steps=steps, guidance=guidance)
    batches = []
    for start in range(0, len(captions), batch_size):
        batches.append(predict(captions[start:start + batch_size], {**params, "seed": seed + start}))
    images = np.concatenate(batches)
    classified = [classify(image) for image in images]
    n_held = len(held) * per_prompt
    metrics = {**score_classified(classified[:n_held], expected[:n_held]),
               **{f"seen_{k}": v for k, v in score_classified(classified[n_held:], expected[n_held:]).items()}}
    resolved = {**defaults, **params}
    return Evaluation(
        model_uri=source.uri, prompts=held, seen_prompts=familiar, per_prompt=per_prompt, params=resolved,
        images=images, classified=classified, metrics=metrics, run_id=source.run_id, model_name=source.name,
        model_version=source.version, eval_set_id=evaluation_set_id(held, familiar, per_prompt, resolved),
    )


def evaluation_set_id(held: list[Prompt], seen: list[Prompt], per_prompt: int, params: dict) -> str:
    """16 hex digits of a sha256 over what decides the scores besides the model: the prompts in order,
    images per prompt, the seed and the sampler settings. A gate compares scores only under one id."""
    identity = {"heldout": [p.caption for p in held], "seen": [p.caption for p in seen], "per_prompt": per_prompt,
                **{k: params.get(k) for k in ("seed", "sampler", "steps", "guidance")}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Source:
    uri: str
    run_id: str | None = None
    name: str | None = None
    version: str | None = None


def _resolve(model_uri: str) -> _Source:
    """Pin a models:/ URI to one version and find the run behind a models:/ or runs:/ URI."""
    if _is_pipeline_folder(model_uri):
        return _Source(uri=model_uri)
    if model_uri.startswith("runs:/"):
        return _Source(uri=model_uri, run_id=model_uri[len("runs:/"):].split("/", 1)[0])
    if not model_uri.startswith("models:/"):
        raise EvaluationError(f"--model must be models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH or a "
                              f"pipeline folder (with model_index.json), got {model_uri!r}")
    from mlflow import MlflowClient

    setup_mlflow()
    client = MlflowClient()
    ref = model_uri[len("models:/"):].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if version == "latest":
            mv = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), default=None)
            if mv is None:
                raise EvaluationError(f"{model_uri}: no versions of registered model {name!r}")
        elif version.isdigit():
            mv = client.get_model_version(name, version)
        else:
            raise EvaluationError(f"{model_uri}: give a version number, `latest` or @ALIAS, not a stage")
    else:  # MLflow 3's models:/<model_id>, a logged model outside the registry
        return _Source(uri=model_uri, run_id=client.get_logged_model(ref).source_run_id)
    return _Source(uri=f"models:/{name}/{mv.version}", run_id=mv.run_id, name=name, version=str(mv.version))


def held_out_loss(evaluation: Evaluation) -> dict[str, float]:
    """The evaluated model's fixed-timestep validation loss (validation.timesteps, noise fixed by
    validation.seed: what training logged as val_loss, on the exported EMA weights) on the held-out
    split of the data its run trained on; {} for a model without a run, or a run without a split."""
    if evaluation.run_id is None:
        return {}
    import mlflow

    run = mlflow.MlflowClient().get_run(evaluation.run_id)
    data = run.data.tags.get("data")
    try:
        cfg = config_from_dict(mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}"))
    except Exception as e:  # a model logged by hand, without ldmflow's config artifact
        log.info("run %s has no readable %s (%s): no validation loss", evaluation.run_id, CONFIG_ARTIFACT, e)
        return {}
    v = cfg.validation
    if not data or v.holdout_fraction <= 0:
        return {}
    held = read_split(read_dataset(data), v.holdout_fraction, cfg.model.resolution, v.max_samples)

    pipe = load_pipeline(fetch_mlflow_folder(evaluation.model_uri, "--model"))
    te = cfg.model.text_encoder
    text = TextEncoder(tokenizer=pipe.tokenizer, model=pipe.text_encoder, max_length=te.max_length,
                       use_attention_mask=te.use_attention_mask)
    parts = Components(unet=pipe.unet, vae=pipe.vae, text=text,
                       noise_scheduler=build_noise_scheduler(cfg.model.scheduler))
    return LatentDiffusionTask(cfg, parts, device=pipe.device).validate(pipe.unet, held)


def _is_pipeline_folder(uri: str) -> bool:
    return "://" not in uri and ":/" not in uri and (Path(uri) / "model_index.json").is_file()


def _load(uri: str):
    """predict(prompts, params) -> uint8 images for the model at `uri`, the params it defaults to, and
    the most prompts it takes in one request (None: a model from before request limits)."""
    if _is_pipeline_folder(uri):
        from types import SimpleNamespace

        model = TextToImageModel()
        model.load_context(SimpleNamespace(artifacts={PIPELINE_ARTIFACT: str(uri)}))
        return (lambda prompts, params: model.predict(None, prompts, params)), dict(model.defaults), \
            model.limits.max_prompts
    import mlflow.pyfunc
    import pandas as pd

    setup_mlflow()
    model = mlflow.pyfunc.load_model(uri)
    schema = model.metadata.get_params_schema()
    # MLflow fills what a request leaves out from the signature: its defaults are the model's.
    defaults = {p.name: p.default for p in schema.params if p.default is not None} if schema else {}
    limits = getattr(model.unwrap_python_model(), "limits", None)
    return (lambda prompts, params: model.predict(pd.DataFrame({"prompt": prompts}), params=params)), defaults, \
        getattr(limits, "max_prompts", None)


METRIC_PREFIX = "eval_"


TAG_PREFIX = "eval."


def record(evaluation: Evaluation) -> None:
    """Log the scores to the run that produced the model (metrics eval_<attribute>_adherence on the
    held-out prompts, eval_seen_<attribute>_adherence on the seen ones, the grid and results.json under
    eval/) and tag the model version with them (eval.<attribute>_adherence, eval.seen_..., eval.n,
    eval.seen_n, eval.set_id, eval.settings). A local pipeline folder has neither: nothing is recorded."""
    if evaluation.run_id is None:
        log.info("%s is not an MLflow model: results not recorded", evaluation.model_uri)
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    setup_mlflow()
    client = MlflowClient()
    scores = {k: v for k, v in evaluation.metrics.items() if k.endswith("_adherence") or k.startswith("val_loss")}
    now = int(time.time() * 1000)
    client.log_batch(evaluation.run_id, metrics=[Metric(METRIC_PREFIX + k, v, now, 0) for k, v in scores.items()],
                     synchronous=True)
    client.log_image(evaluation.run_id, evaluation.grid(), "eval/grid.png")
    client.log_dict(evaluation.run_id, evaluation.results(), "eval/results.json")
    if evaluation.model_version is not None:
        settings = {"prompts": len(evaluation.prompts), "seen_prompts": len(evaluation.seen_prompts),
                    "per_prompt": evaluation.per_prompt, **evaluation.params}
        tags = {**{TAG_PREFIX + k: f"{v:.4f}" for k, v in scores.items()},
                TAG_PREFIX + "n": str(evaluation.metrics["n"]),
                TAG_PREFIX + "seen_n": str(evaluation.metrics.get("seen_n", 0)),
                TAG_PREFIX + "set_id": evaluation.eval_set_id,
                TAG_PREFIX + "settings": json.dumps(settings, sort_keys=True)}
        for key, value in tags.items():
            client.set_model_version_tag(evaluation.model_name, evaluation.model_version, key, value)


def save_results(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write grid.png (a row per prompt) and results.json into `out_dir`; returns the grid's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "grid.png"
    storage.put_bytes(grid, encode_image(Image.fromarray(evaluation.grid()), "png", 100))
    results = out / "results.json"
    storage.put_bytes(results, (json.dumps(evaluation.results(), indent=2) + "\n").encode())
    evaluation.grid_path = grid
    return grid


def run_evaluation(model_uri: str, *, out_dir: str | Path | None = None, **options) -> Evaluation:
    """evaluate_model, then record the results in MLflow and save them under `out_dir` (default:
    <runs dir>/eval/<model>); `options` are evaluate_model's. What `ldmflow evaluate` and the demo run."""

    if out_dir is not None:
        out_dir = storage.local_path(out_dir)  # an s3:// URI refused before the (slow) generation
    evaluation = evaluate_model(model_uri, **options)
    evaluation.metrics.update(held_out_loss(evaluation))
    if out_dir is None:

        label = (f"{evaluation.model_name}-v{evaluation.model_version}" if evaluation.model_version
                 else evaluation.run_id or Path(model_uri).name)
        out_dir = runs_dir() / "eval" / label
    save_results(evaluation, out_dir)
    record(evaluation)
    return evaluation
