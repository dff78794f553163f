"""Batch generation: every prompt of a file, `per_prompt` images each, into a folder or s3:// prefix.

Names and seeds are fixed by position: image j of prompt i is ``p{i:05d}-{j:03d}.png`` and starts
from the noise of ``seed + i * per_prompt + j``. Each image is published atomically
(storage.put_bytes), so an image that exists is complete; a rerun skips what exists and generates the
rest, and the result is byte for byte what one uninterrupted run with the same batch size writes
(requests are fixed slices of the plan: see _requests).
``index.json`` (the manifest: model, params, every image with its prompt, seed and sha256) is written
last, atomically, once every image exists: a folder without it is unfinished.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from data_prep import storage
from training.errors import ConfigError, ModelLoadError, PromptFileError
from training.mlops.generate import Predict, check_uri, load_generator, png_bytes, request_params

log = logging.getLogger(__name__)

INDEX = "index.json"
PROMPT_COLUMN = "prompt"


@dataclass(frozen=True)
class BatchJob:
    model: str
    """models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a pipeline folder."""
    prompts: str
    """A text file (one prompt a line), a .csv or a .jsonl with a `prompt` column; local or s3://."""
    out: str
    """Folder or s3:// prefix the images and index.json go to."""
    per_prompt: int = 1
    """Images per prompt."""
    seed: int = 0
    """Image j of prompt i starts from the noise of seed + i * per_prompt + j."""
    batch_size: int = 8
    """Images per model request; keep it for a rerun (another value may change images in their last bits)."""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    max_new: int | None = None
    """Stop after writing this many new images (a partial run; a rerun continues)."""

    def __post_init__(self) -> None:
        for name in ("per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.max_new is not None and self.max_new < 0:
            raise ConfigError(f"--limit (max_new) must be >= 0, got {self.max_new}")


@dataclass(frozen=True)
class Item:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:05d}-{self.image_index:03d}.png"


@dataclass
class BatchResult:
    out: str
    total: int
    written: int
    skipped: int
    complete: bool
    index: str | None = None
    """The index.json URI, once every image exists."""
    names: list[str] = field(default_factory=list)


def read_prompts(uri: str) -> list[str]:
    """The prompts of `uri`: a .csv (column `prompt`), a .jsonl (key `prompt`), else one per line;
    blank lines are skipped."""
    try:
        text = storage.storage_for(uri).read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise PromptFileError(f"prompt file {uri} is not UTF-8 text") from None
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if PROMPT_COLUMN not in (reader.fieldnames or []):
            raise PromptFileError(f"prompt file {uri} has no `{PROMPT_COLUMN}` column (columns: "
                                  f"{', '.join(reader.fieldnames or []) or 'none'})")
        prompts = [row[PROMPT_COLUMN] or "" for row in reader]
    elif suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"prompt file {uri} line {n} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get(PROMPT_COLUMN), str):
                raise PromptFileError(f"prompt file {uri} line {n} has no string `{PROMPT_COLUMN}`")
            prompts.append(row[PROMPT_COLUMN])
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {uri} holds no prompts")
    return prompts


def plan(prompts: list[str], per_prompt: int, seed: int) -> list[Item]:
    return [Item(i, j, p, seed + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)]


def _requests(items: list[Item], batch_size: int) -> list[list[Item]]:
    """The plan cut into fixed requests of batch_size consecutive images (consecutive seeds: a request
    gives image k seed + k). Fixed, not formed from what is missing, because a batched UNet call on CPU
    is not bit-identical across batch compositions (BLAS blocking): an image is always made by the
    same request, so a resumed run writes the bytes an uninterrupted one does (with the same
    --batch-size)."""
    return [items[k:k + batch_size] for k in range(0, len(items), batch_size)]


class _Progress:
    """tqdm when it is installed; else a log line every 10 s and at the end."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.last = total, done, time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=done, unit="img", desc="generate-batch")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last > 10 or self.done == self.total:
            self.last = time.monotonic()
            log.info("generate-batch: %d/%d images", self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(job: BatchJob, *, load: Callable[[str], Predict] = load_generator) -> BatchResult:
    check_uri(job.model)
    prompts = read_prompts(job.prompts)
    store = storage.storage_for(job.out)
    store.check_writable(job.out)
    items = plan(prompts, job.per_prompt, job.seed)
    present = {o.name for o in store.list(job.out, recursive=False) if o.size > 0}
    skipped = sum(item.name in present for item in items)
    todo = [r for r in _requests(items, job.batch_size) if any(item.name not in present for item in r)]
    log.info("generate-batch: %d images, %d already in %s", len(items), skipped, job.out)
    written = 0
    if todo:
        predict = load(job.model)
        progress = _Progress(len(items), skipped)
        try:
            for request in todo:
                if job.max_new is not None and written >= job.max_new:
                    break
                params = request_params(seed=request[0].seed, sampler=job.sampler, steps=job.steps,
                                        guidance=job.guidance)
                images = predict([item.prompt for item in request], params)
                new = [(item, image) for item, image in zip(request, images, strict=True) if item.name not in present]
                if job.max_new is not None:
                    new = new[:job.max_new - written]
                for item, image in new:
                    store.put_bytes(storage.join(job.out, item.name), png_bytes(image))
                written += len(new)
                progress.update(len(new))
        finally:
            progress.close()
    missing = len(items) - skipped - written
    result = BatchResult(out=job.out, total=len(items), written=written, skipped=skipped, complete=missing == 0,
                         names=[item.name for item in items])
    if result.complete:
        result.index = write_index(job, items, store)
    return result


def write_index(job: BatchJob, items: list[Item], store: storage.Storage) -> str:
    entries = []
    for item in items:
        data = store.read_bytes(storage.join(job.out, item.name))
        entries.append({"file": item.name, "prompt_index": item.prompt_index, "image_index": item.image_index,
                        "prompt": item.prompt, "seed": item.seed, "sha256": hashlib.sha256(data).hexdigest()})
    index = {"schema": 1, "model": job.model, "prompts": job.prompts, "per_prompt": job.per_prompt,
             "seed": job.seed, "params": request_params(seed=job.seed, sampler=job.sampler, steps=job.steps,
                                                        guidance=job.guidance),
             "images": entries}
    uri = storage.join(job.out, INDEX)
    store.put_bytes(uri, json.dumps(index, indent=1).encode())
    return uri


__all__ = ["BatchJob", "BatchResult", "ModelLoadError", "PromptFileError", "read_prompts", "run_batch"]
