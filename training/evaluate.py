"""Caption adherence on the synthetic shapes task: does a generated image show the shape and colours
its prompt asked for?

The prompts are captions of data_prep/synth.py ("a red circle on a blue background"), drawn from the
shape x colour x background grid, so their truth is known. `classify` reads those three attributes
back from an image without any learnt model:

- background: the border pixels, each snapped to the nearest named colour; the most common name wins
  (a shape covers at most 70% of two sides, so never most of the border);
- foreground: the pixels far from the border's median colour, the cut chosen by Otsu's method on that
  distance, so a low-contrast pair (yellow on orange) and a soft-edged generated image both split;
- colour: the nearest named colour to the median of the foreground's core (its pixels furthest from
  the background, away from edges that blend the two colours);
- shape: the foreground's coverage map (how much of each pixel the shape covers) cut to its
  bounding box and scaled to a fixed grid, against templates drawn by synth's own `_draw_shape`
  (so it shares the generator's geometry) and blurred to several degrees (a model's output is soft),
  by soft intersection over union.

tests/training/test_evaluate.py holds it to >= 0.98 on the generator's own images at 32 and 64 px,
and checks it on blurred, colour-shifted and noisy copies of them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep.synth import COLOURS, SHAPES, _draw_shape, caption_for
from training.errors import EvaluationError

log = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "background")
"""What adherence is scored on, in the order tables print them."""

_NAMES = tuple(COLOURS)
_RGB = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)
_GRID = 16  # side of the grid a shape's crop is compared on; a 32 px image's smallest shape is 10 px
_TEMPLATE_SIDE = 128  # templates are drawn this large, then scaled down to the grid
_BLURS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.25)  # template blurs, sigma / side: a generated image's edges are soft
_MIN_CONTRAST = 30.0  # RGB distance below which a pixel is background whatever Otsu says (noise, JPEG)
_MIN_PIXELS = 4  # fewer foreground pixels than this: no shape at all


# --- prompts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One synthetic prompt: what the image should show."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.background)


def heldout_prompts(n: int, *, seed: int = 0) -> list[Prompt]:
    """`n` distinct prompts from the shape x colour x background grid, chosen by `seed` and balanced:
    every shape, colour and background appears as evenly as n allows, so each attribute's adherence
    is measured over all its values, not over whatever a random draw of a few prompts happened to hit."""
    grid = [Prompt(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]
    if not 1 <= n <= len(grid):
        raise EvaluationError(f"the number of evaluation prompts must be 1-{len(grid)} (the shape x colour x "
                         f"background grid), got {n}")
    random.Random(seed).shuffle(grid)
    counts: Counter = Counter()
    chosen = []
    for _ in range(n):
        # The least used shape and colour first, then the least used background; the shuffle breaks ties.
        best = min(grid, key=lambda p: (counts["s", p.shape] + counts["c", p.colour], counts["b", p.background]))
        grid.remove(best)
        chosen.append(best)
        counts.update([("s", best.shape), ("c", best.colour), ("b", best.background)])
    return chosen


# --- reading an image back ----------------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """What `classify` sees in an image; shape and colour are None when nothing stands out of the
    background."""

    shape: str | None
    colour: str | None
    background: str


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Indices into COLOURS of the named colours nearest to each of `rgb` (..., 3)."""
    distances = np.linalg.norm(np.asarray(rgb, dtype=np.float32)[..., None, :] - _RGB, axis=-1)
    return distances.argmin(axis=-1)


def classify(image: np.ndarray) -> Classified:
    """Shape, colour and background of one uint8 image (H, W, 3)."""
    pixels = np.asarray(image)[..., :3].astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    snapped = nearest_colour(border)
    background = int(np.bincount(snapped, minlength=len(_NAMES)).argmax())
    reference = np.median(border[snapped == background], axis=0)  # the background as rendered

    distance = np.linalg.norm(pixels - reference, axis=-1)
    mask = distance > max(_otsu_threshold(distance), _MIN_CONTRAST)
    if mask.sum() < _MIN_PIXELS:
        return Classified(shape=None, colour=None, background=_NAMES[background])
    # The core: inside the mask's edge and among its pixels furthest from the background, where a
    # soft or anti-aliased edge has not blended the two colours.
    core = _erode(mask)
    if core.sum() < _MIN_PIXELS:
        core = mask
    core = core & (distance >= np.median(distance[core]))
    foreground = np.median(pixels[core], axis=0)
    colour = _NAMES[int(nearest_colour(foreground))]
    # A pixel blending the two colours a : 1-a lies a * |fg - bg| from the background, so its distance
    # over the full contrast is how much of it the shape covers; the background's own spread (noise,
    # texture) is subtracted first, so the background reads as 0.
    floor = float(np.median(np.linalg.norm(border[snapped == background] - reference, axis=-1)))
    contrast = max(float(np.linalg.norm(foreground - reference)) - floor, 1.0)
    coverage = np.clip((distance - floor) / contrast, 0.0, 1.0)
    return Classified(shape=_match_shape(coverage), colour=colour, background=_NAMES[background])


def _otsu_threshold(values: np.ndarray) -> float:
    """The cut of `values` that maximises the between-class variance (Otsu 1979)."""
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total, total_mean = weight[-1], mean[-1]
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return float(edges[-1])  # a flat image: everything is background
    m0 = mean[:-1] / np.maximum(w0, 1)
    m1 = (total_mean - mean[:-1]) / np.maximum(w1, 1)
    between = np.where(valid, w0 * w1 * (m0 - m1) ** 2, -1.0)
    return float(edges[1:][between.argmax()])


def _erode(mask: np.ndarray) -> np.ndarray:
    """`mask` without its edge pixels (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _to_grid(coverage: np.ndarray) -> np.ndarray:
    """The bounding box of `coverage` >= half its peak cut out of `coverage` and scaled to _GRID x _GRID."""
    inside = coverage >= 0.5 * min(float(coverage.max()), 1.0)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    crop = coverage[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop, mode="F").resize((_GRID, _GRID), Image.Resampling.BILINEAR))


@cache
def _templates() -> dict[tuple[str, float], np.ndarray]:
    """Each shape drawn by synth's `_draw_shape`, then blurred by each of _BLURS (sigma as a fraction
    of the side) and cut out exactly as `_match_shape` cuts out an image's foreground: a blur shrinks
    a star's bounding box (its tips fade first), so the templates must shrink the same way."""
    pad = round(3 * max(_BLURS) * _TEMPLATE_SIDE) + 2
    templates = {}
    for shape in SHAPES:
        image = Image.new("L", (_TEMPLATE_SIDE + 2 * pad,) * 2, 0)
        _draw_shape(ImageDraw.Draw(image), shape, pad, pad, _TEMPLATE_SIDE, 255)
        for blur in _BLURS:
            blurred = image.filter(ImageFilter.GaussianBlur(blur * _TEMPLATE_SIDE)) if blur else image
            coverage = np.asarray(blurred, dtype=np.float32)
            # Normalised by its peak, as an image's coverage is by its foreground's (blurred) core colour.
            templates[shape, blur] = _to_grid(coverage / coverage.max())
    return templates


def _match_shape(coverage: np.ndarray) -> str:
    """The shape whose template (at any blur) overlaps the foreground's crop best (soft IoU)."""
    observed = _to_grid(coverage)
    scores = {key: np.minimum(observed, t).sum() / np.maximum(observed, t).sum() for key, t in _templates().items()}
    return max(scores, key=scores.get)[0]


def adherence(images: np.ndarray, prompts: list[Prompt]) -> dict[str, float]:
    """Fractions of `images` (N, H, W, 3) whose colour, shape and background match prompts[i]'s,
    and n, the number of images."""
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"adherence needs one prompt per image and at least one image; got {len(images)} "
                         f"images and {len(prompts)} prompts")
    seen = [classify(image) for image in images]
    return _fractions(seen, prompts)


def _fractions(seen: list[Classified], prompts: list[Prompt]) -> dict[str, float]:
    scores = {f"{a}_adherence": float(np.mean([getattr(s, a) == getattr(p, a) for s, p in zip(seen, prompts)]))
              for a in ATTRIBUTES}
    return {**scores, "n": len(prompts)}


# --- running a model --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One evaluation of a model: what was asked, what came back, how it scored."""

    model_uri: str
    """The URI evaluated; a models:/ alias is pinned to the version it pointed at."""
    prompts: list[Prompt]
    """The held-out prompts, each asked `per_prompt` times."""
    per_prompt: int
    """Images per prompt."""
    params: dict
    """The request: sampler, steps, guidance and seed (image j of `images` started from seed + j)."""
    images: np.ndarray
    """(len(prompts) * per_prompt, H, W, 3) uint8; prompt p's images are p * per_prompt onwards."""
    classified: list[Classified]
    """What `classify` read in each image."""
    metrics: dict[str, float]
    """colour_adherence, shape_adherence, background_adherence (fractions of images) and n."""
    run_id: str | None = None
    """The MLflow run that logged the model (models:/ and runs:/ URIs): where results are recorded."""
    model_name: str | None = None
    model_version: str | None = None
    """The registered model version evaluated (models:/ URIs), whose tags get the results."""
    grid_path: Path | None = field(default=None, repr=False)
    """Where save_results wrote the grid of images (a row per prompt)."""

    @property
    def expected(self) -> list[Prompt]:
        """The prompt of each image."""
        return [p for p in self.prompts for _ in range(self.per_prompt)]

    def grid(self) -> np.ndarray:
        from training.sampling import image_grid

        return image_grid(self.images, columns=self.per_prompt)

    def results(self) -> dict:
        """Everything but the pixels, as JSON: settings, scores, and what each image was read as."""
        return {
            "model_uri": self.model_uri, "per_prompt": self.per_prompt, "params": self.params,
            "metrics": self.metrics,
            "images": [{"prompt": p.caption, "expected": asdict(p), "classified": asdict(c)}
                       for p, c in zip(self.expected, self.classified)],
        }

    def table(self) -> str:
        p = self.params
        lines = [f"{self.model_uri}: {len(self.prompts)} prompts x {self.per_prompt} images, sampler "
                 f"{p.get('sampler', '?')}, {p.get('steps', '?')} steps, guidance {p.get('guidance', '?')}, "
                 f"seed {p['seed']}",
                 f"{'attribute':<12}{'adherence':>10}{'chance':>8}"]
        chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "background": 1 / len(COLOURS)}
        for a in ATTRIBUTES:
            lines.append(f"{a:<12}{self.metrics[f'{a}_adherence']:>10.3f}{chance[a]:>8.2f}")
        if "val_loss" in self.metrics:
            lines.append(f"held-out loss at fixed timesteps: {self.metrics['val_loss']:.4f}")
        return "\n".join(lines)


def evaluate_model(model_uri: str, *, prompts: int = 12, per_prompt: int = 4, steps: int | None = None,
                   guidance: float | None = None, sampler: str | None = None, seed: int = 0,
                   batch_size: int = 32) -> Evaluation:
    """Generate `per_prompt` images for each of `prompts` held-out prompts (heldout_prompts(prompts,
    seed=seed)) with the model at `model_uri`, and score them. The model is a models:/ or runs:/
    URI (loaded as its MLflow pyfunc) or a local pipeline folder. Requests of up to `batch_size`
    images; image j starts from the noise of seed + j whatever the batching. Steps, guidance and
    sampler left None take the model's recorded defaults."""
    from training.sampling import request_params

    if per_prompt < 1 or batch_size < 1:
        raise EvaluationError(f"per_prompt and batch_size must be >= 1, got {per_prompt} and {batch_size}")
    chosen = heldout_prompts(prompts, seed=seed)
    source = _resolve(model_uri)
    predict, defaults = _load(source.uri)
    expected = [p for p in chosen for _ in range(per_prompt)]
    captions = [p.caption for p in expected]
    params = request_params(seed=seed, sampler=sampler, steps=steps, guidance=guidance)
    batches = []
    for start in range(0, len(captions), batch_size):
        batches.append(predict(captions[start:start + batch_size], {**params, "seed": seed + start}))
    images = np.concatenate(batches)
    classified = [classify(image) for image in images]
    return Evaluation(
        model_uri=source.uri, prompts=chosen, per_prompt=per_prompt, params={**defaults, **params}, images=images,
        classified=classified, metrics=_fractions(classified, expected), run_id=source.run_id,
        model_name=source.name, model_version=source.version,
    )


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

    from training.tracking import setup_mlflow

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

    from data_prep.dataset import read_dataset
    from training.config import config_from_dict
    from training.model_folders import fetch_mlflow_folder
    from training.models import Components, build_noise_scheduler
    from training.runner import CONFIG_ARTIFACT
    from training.shard_loader import read_split
    from training.tasks import LatentDiffusionTask
    from training.text_encoder import TextEncoder

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
    from training.pyfunc_model import load_pipeline

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
    """predict(prompts, params) -> uint8 images for the model at `uri`, and the params it defaults to."""
    if _is_pipeline_folder(uri):
        from types import SimpleNamespace

        from training.pyfunc_model import PIPELINE_ARTIFACT, TextToImageModel

        model = TextToImageModel()
        model.load_context(SimpleNamespace(artifacts={PIPELINE_ARTIFACT: str(uri)}))
        return (lambda prompts, params: model.predict(None, prompts, params)), dict(model.defaults)
    import mlflow.pyfunc
    import pandas as pd

    from training.tracking import setup_mlflow

    setup_mlflow()
    model = mlflow.pyfunc.load_model(uri)
    schema = model.metadata.get_params_schema()
    # MLflow fills what a request leaves out from the signature: its defaults are the model's.
    defaults = {p.name: p.default for p in schema.params} if schema else {}
    return (lambda prompts, params: model.predict(pd.DataFrame({"prompt": prompts}), params=params)), defaults


# --- recording results --------------------------------------------------------------------------


METRIC_PREFIX = "eval_"
TAG_PREFIX = "eval."


def record(evaluation: Evaluation) -> None:
    """Log the scores to the run that produced the model (metrics eval_<attribute>_adherence, the grid
    and results.json under eval/) and tag the model version with them (eval.<attribute>_adherence,
    eval.settings). A local pipeline folder has neither: nothing is recorded."""
    if evaluation.run_id is None:
        log.info("%s is not an MLflow model: results not recorded", evaluation.model_uri)
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from training.tracking import setup_mlflow

    setup_mlflow()
    client = MlflowClient()
    scores = {k: v for k, v in evaluation.metrics.items() if k.endswith("_adherence") or k.startswith("val_loss")}
    now = int(time.time() * 1000)
    client.log_batch(evaluation.run_id, metrics=[Metric(METRIC_PREFIX + k, v, now, 0) for k, v in scores.items()],
                     synchronous=True)
    client.log_image(evaluation.run_id, evaluation.grid(), "eval/grid.png")
    client.log_dict(evaluation.run_id, evaluation.results(), "eval/results.json")
    if evaluation.model_version is not None:
        settings = {"prompts": len(evaluation.prompts), "per_prompt": evaluation.per_prompt, **evaluation.params}
        tags = {**{TAG_PREFIX + k: f"{v:.4f}" for k, v in scores.items()},
                TAG_PREFIX + "n": str(evaluation.metrics["n"]),
                TAG_PREFIX + "settings": json.dumps(settings, sort_keys=True)}
        for key, value in tags.items():
            client.set_model_version_tag(evaluation.model_name, evaluation.model_version, key, value)


def save_results(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write grid.png (a row per prompt) and results.json into `out_dir`; returns the grid's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "grid.png"
    Image.fromarray(evaluation.grid()).save(grid.with_name(".grid.png.tmp"), format="PNG")
    grid.with_name(".grid.png.tmp").replace(grid)
    results = out / "results.json"
    results.with_name(".results.json.tmp").write_text(json.dumps(evaluation.results(), indent=2) + "\n")
    results.with_name(".results.json.tmp").replace(results)
    evaluation.grid_path = grid
    return grid


def run_evaluation(model_uri: str, *, out_dir: str | Path | None = None, **options) -> Evaluation:
    """evaluate_model, then record the results in MLflow and save them under `out_dir` (default:
    <runs dir>/eval/<model>); `options` are evaluate_model's. What `ldmflow evaluate` and the demo run."""
    from data_prep import storage

    if out_dir is not None:
        out_dir = storage.local_path(out_dir)  # an s3:// URI refused before the (slow) generation
    evaluation = evaluate_model(model_uri, **options)
    evaluation.metrics.update(held_out_loss(evaluation))
    if out_dir is None:
        from training.tracking import runs_dir

        label = (f"{evaluation.model_name}-v{evaluation.model_version}" if evaluation.model_version
                 else evaluation.run_id or Path(model_uri).name)
        out_dir = runs_dir() / "eval" / label
    save_results(evaluation, out_dir)
    record(evaluation)
    return evaluation
