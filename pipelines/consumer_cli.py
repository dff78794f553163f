"""Consumer commands of ``ldmflow``: `generate` and `generate-batch` from a registered model."""

from __future__ import annotations

import argparse
import logging


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS (e.g. models:/ldm-tiny@champion), "
                                                   "models:/NAME/VERSION, runs:/RUN_ID/model or a pipeline folder")


def quiet_retries() -> None:
    # urllib3 logs a WARNING per retried connection; a down server is reported once, by ModelLoadError.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def cmd_generate(args: argparse.Namespace) -> int:
    from training.errors import ConfigError
    from training.mlops.generate import generate_from_registry

    if args.n < 1 or (args.steps is not None and args.steps < 1):
        raise ConfigError("--n and --steps must be >= 1")
    quiet_retries()
    paths = generate_from_registry(args.model, args.prompt, args.out, n=args.n, seed=args.seed,
                                   steps=args.steps, guidance=args.guidance, sampler=args.sampler)
    for path in paths:
        print(path)
    return 0


def cmd_generate_batch(args: argparse.Namespace) -> int:
    from training.mlops.batch_generate import BatchJob, run_batch

    job = BatchJob(model=args.model, prompts=args.prompts, out=args.out, per_prompt=args.per_prompt, seed=args.seed,
                   batch_size=args.batch_size, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                   max_new=args.limit)
    quiet_retries()
    result = run_batch(job)
    print(f"{result.written} images written, {result.skipped} already there, {result.total} in all -> {result.out}")
    if not result.complete:
        print(f"stopped at --limit; rerun the same command to write the remaining "
              f"{result.total - result.written - result.skipped}")
        return 0
    print(f"index: {result.index}")
    return 0


def add_consumer_commands(sub, add_sampling_args) -> None:
    """Add `generate` and `generate-batch` to ldmflow's subparsers."""
    p = sub.add_parser("generate", help="load a registered model through MLflow and write PNGs")
    add_model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="folder or s3:// prefix")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("generate-batch", help="images for every prompt of a file into a folder or s3:// prefix; "
                                              "a rerun continues where a run stopped")
    add_model_arg(p)
    p.add_argument("--prompts", required=True, help="text file (a prompt a line), or .csv / .jsonl with a "
                                                    "`prompt` column; local or s3://")
    p.add_argument("--out", required=True, help="folder or s3:// prefix; index.json is written when all exist")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i starts from seed + i*per_prompt + j")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default: %(default)s)")
    p.add_argument("--limit", type=int, help="write at most this many new images, then stop (rerun continues)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate_batch)
