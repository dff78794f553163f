"""``ldmflow``: thin commands that parse arguments, build a config, and call one library function.

Every input is checked before work starts; a problem ends the command with one line naming it
(exit code 2), not a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from data_prep.errors import DataPrepError
from training.config import ConfigError, RunConfig, load_config
from training.shard_loader import DataError

DEFAULT_CONFIG = "configs/tiny.yaml"


class UsageError(Exception):
    """Bad command-line input."""


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """--set pairs plus the --max-steps / --num-workers shorthands, in that order."""
    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    return overrides


def build_run_config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, overrides_from_args(args))


def require_dir(path: str, what: str) -> str:
    if not Path(path).is_dir():
        raise UsageError(f"{what} {path} does not exist or is not a folder")
    return path


# --- commands ---------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from data_prep.synth import generate_synthetic

    samples = generate_synthetic(args.out, args.n, seed=args.seed, image_size=args.size)
    print(f"wrote {len(samples)} synthetic image-caption pairs to {args.out}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from data_prep.shard import ShardConfig, build_shards

    config = ShardConfig(source=args.source, output=args.output, resolution=args.resolution,
                         samples_per_shard=args.samples_per_shard, image_format=args.image_format,
                         overwrite=args.overwrite)
    manifest = build_shards(config)
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(manifest.skipped.items())) or "none"
    print(f"wrote {manifest.total_samples} samples in {len(manifest.shards)} shards to {args.output} "
          f"(skipped: {skipped})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.runner import check_data, publish, train

    cfg = build_run_config(args)
    require_dir(args.data, "shard folder")
    check_data(cfg, args.data)
    outcome = train(cfg, args.data)
    print(f"MLflow run {outcome.run_id}; final checkpoint {outcome.checkpoint_dir}")
    if not args.no_register:
        version = publish(outcome, cfg)
        print(f"registered {version.name} version {version.version} with alias candidate")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from training.sampling import generate_from_registry

    if args.n < 1 or args.steps < 1:
        raise UsageError("--n and --steps must be >= 1")
    from mlflow.exceptions import MlflowException

    try:
        paths = generate_from_registry(args.model, args.prompt, args.out, n=args.n, seed=args.seed,
                                       steps=args.steps, guidance=args.guidance)
    except MlflowException as e:
        raise UsageError(f"cannot load {args.model} from MLflow: {e.message}") from None
    for path in paths:
        print(path)
    return 0


def cmd_flow(args: argparse.Namespace) -> int:
    build_run_config(args)  # validate before Prefect is even imported
    if args.source:
        require_dir(args.source, "source folder")
    from pipelines.flows import run_pipeline

    summary = run_pipeline(
        config_path=args.config,
        overrides=overrides_from_args(args),
        source=args.source,
        synth_n=args.synth_n,
        work_dir=args.work_dir,
        samples_per_shard=args.samples_per_shard,
        overwrite_shards=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["state"] == "COMPLETED" else 1


# --- parser -----------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML preset (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="shorthand for --set train.max_steps=N")
    p.add_argument("--num-workers", type=int, help="shorthand for --set train.num_workers=N")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ldmflow", description=__doc__.splitlines()[0])
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic shapes image-caption set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("shard", help="image folder with .txt captions -> WebDataset shards + manifest")
    p.add_argument("--source", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"])
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="Ray Train + DeepSpeed training, tracked and registered in MLflow")
    add_train_args(p)
    p.add_argument("--data", required=True, help="shard folder with manifest.json")
    p.add_argument("--no-register", action="store_true", help="train only; skip export and registration")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="load a registered model through MLflow and write PNGs")
    p.add_argument("--model", required=True, help="e.g. models:/ldm-tiny@candidate")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("flow", help="run the whole chain as one Prefect flow: (synth) -> shard -> train -> register")
    add_train_args(p)
    p.add_argument("--source", help="image folder with captions; omitted: a synthetic set is generated")
    p.add_argument("--synth-n", type=int, default=64, help="synthetic samples when no --source")
    p.add_argument("--work-dir", default="runs/work", help="where raw data and shards go")
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--overwrite", action="store_true", help="replace shards from an earlier run")
    p.set_defaults(func=cmd_flow)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LDMFLOW_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataPrepError, DataError, FileNotFoundError) as e:
        print(f"ldmflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
