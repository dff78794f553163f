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

from data_prep.errors import DataPrepError
from pipelines.console import quiet_third_party
from pipelines.deployments import DeployError
from pipelines.registry_cli import add_registry_parser
from training.errors import (ConfigError, DataError, EvaluationError, ModelLoadError, PromptFileError,
                             TrackingUnavailable)

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


def build_run_config(args: argparse.Namespace):
    from training.config import load_config  # imported here: `ldmflow shard` and `synth` do not need it

    return load_config(args.config, overrides_from_args(args))


# --- commands ---------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from data_prep.synth import generate_synthetic

    samples = generate_synthetic(args.out, args.n, seed=args.seed, image_size=args.size)
    print(f"wrote {len(samples)} synthetic image-caption pairs to {args.out}")
    return 0


def shard_config_from_args(args: argparse.Namespace):
    from data_prep.shard import ShardConfig

    if not args.source or not args.output:
        raise UsageError("shard needs --source and --output (or: ldmflow shard verify PATH)")
    return ShardConfig(
        source=args.source, output=args.output, resolution=args.resolution, resize_mode=args.resize_mode,
        image_format=args.image_format, quality=args.quality, jpeg_subsampling=args.jpeg_subsampling,
        min_size=args.min_size, max_pixels=args.max_pixels,
        max_image_bytes=args.max_image_bytes, samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes or None, keep_empty_captions=args.keep_empty_captions,
        follow_symlinks=args.follow_symlinks, allow_private_hosts=args.allow_private_hosts,
        allowed_roots=tuple(args.allow_root), keep_url_query=args.keep_url_query,
        dedup=not args.no_dedup, source_format=args.source_format, url_column=args.url_column,
        caption_column=args.caption_column, caption_field=args.caption_field, processes=args.processes,
        executor="ray" if args.ray_address else "processes", ray_address=args.ray_address,
        fetch_timeout=args.fetch_timeout, fetch_retries=args.fetch_retries, read_threads=args.read_threads,
        overwrite=args.overwrite, progress=not args.no_progress,
    )


def cmd_shard(args: argparse.Namespace) -> int:
    if args.shard_command == "verify":
        return cmd_shard_verify(args)
    from data_prep.shard import build_shards

    report = build_shards(shard_config_from_args(args))
    if report.nothing_new:
        print(f"nothing new in {args.source}: {report.existing} items already in {args.output}; nothing written")
    print(f"ldmflow shard -> {args.output}")
    print(report.table())
    return 0


def cmd_shard_verify(args: argparse.Namespace) -> int:
    from data_prep.dataset import verify_dataset

    report = verify_dataset(args.path)
    for orphan in report.orphans:
        print(f"note: {orphan} is not listed by any manifest (left by an unfinished run; readers ignore it)")
    for problem in report.problems:
        print(f"MISMATCH {problem}")
    if not report.ok:
        print(f"{args.path}: {len(report.problems)} problems in {report.shards} shards", file=sys.stderr)
        return 1
    print(f"{args.path}: ok, {report.shards} shards and {report.samples} samples match their manifests")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`ldmflow train` (task ldm) and `ldmflow train-vae` (task vae): one loop, two tasks."""
    from training.mlops.publish import publish, publish_vae
    from training.runtime.driver import check_data, resume, train

    want = "vae" if args.command == "train-vae" else "ldm"
    if args.promote and args.no_register:
        raise UsageError("--promote needs the registration that --no-register skips")
    if getattr(args, "submit", False):
        outcome, cfg = submit_training(args)
    elif args.resume:
        if args.data or args.storage or args.config != args.default_config:
            raise UsageError("--resume continues a run with its own config, data and storage; "
                             "give only --max-steps, --num-workers or --set train.<key> with it")
        outcome, cfg = resume(args.resume, overrides_from_args(args), allow_new_data=args.allow_new_data,
                              forward_credentials=args.forward_credentials)
        if cfg.task != want:
            print(f"note: run {args.resume} trained a `{cfg.task}` model; published as such", file=sys.stderr)
    else:
        if args.allow_new_data:
            raise UsageError("--allow-new-data goes with --resume RUN_ID: a new run trains on whatever --data holds")
        if not args.data:
            raise UsageError("--data is required (or --resume RUN_ID to continue a run)")
        cfg = build_run_config(args)
        if cfg.task != want:
            other = "train-vae" if cfg.task == "vae" else "train"
            raise UsageError(f"{args.config} is a `{cfg.task}` config: run it with `ldmflow {other}`")
        check_data(cfg, args.data)
        outcome = train(cfg, args.data, storage_uri=args.storage, forward_credentials=args.forward_credentials)
    print(f"MLflow run {outcome.run_id}; final checkpoint {outcome.checkpoint_dir}")
    if cfg.task == "vae":
        vae = publish_vae(outcome, cfg)
        psnr = f"{vae.psnr:.2f} dB held-out PSNR" if vae.psnr is not None else "no held-out split"
        print(f"VAE saved to {vae.path} ({vae.uri}); scaling factor {vae.scaling_factor:.4f}; {psnr}")
        print(f"train an LDM on it with --set model.vae.pretrained={vae.path}")
    elif not args.no_register:
        version = publish(outcome, cfg)
        print(f"registered {version.name} version {version.version} with alias candidate")
        if args.promote:
            from pipelines.registry_cli import print_decision
            from training.eval.gate import promote_if_better

            print_decision(promote_if_better(version.name, version.version, cfg.gate))
    return 0


def submit_training(args: argparse.Namespace):
    """`ldmflow train --submit`: the same training as a Ray Job named by --job-key (re-attached,
    or resumed from its last checkpoint, when run again with the same key)."""
    from training.runtime.jobs import run_training_job

    if args.resume or args.allow_new_data:
        raise UsageError("--submit resumes by itself: run the same command with the same --job-key again")
    if not args.data:
        raise UsageError("--submit needs --data")
    if args.forward_credentials:
        raise UsageError("--submit: the job's nodes bring their own credentials (none travel in a job's "
                         "definition); drop --forward-credentials")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
    from training.mlops.tracking import prefect_flow_run_id

    key = args.job_key or prefect_flow_run_id()
    if not key:
        raise UsageError("--submit needs --job-key NAME (the job's identity: the same key re-attaches to it)")
    cfg = build_run_config(args)
    outcome = run_training_job(cfg, args.data, key=key, storage_uri=args.storage, timeout_s=args.timeout,
                               stop_grace_s=args.stop_grace,
                               on_submit=lambda sid: print(f"Ray job {sid}", file=sys.stderr, flush=True))
    return outcome, cfg


def cmd_encode(args: argparse.Namespace) -> int:
    """`ldmflow encode`: raw shards -> latent shards for the config's frozen VAE and text encoder."""
    from training.encode.job import encode_dataset

    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    report = encode_dataset(build_run_config(args), args.data, args.out, workers=args.workers,
                            batch_size=args.batch_size)
    print(f"ldmflow encode {args.data} -> {report.out}")
    print(report.table())
    print(f"train on them with: ldmflow train --config {args.config} --data {report.out}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """`ldmflow job stop KEY`: stop the training job of KEY (as a flow's cancellation does)."""
    from training.runtime.jobs import stop_training_job

    stopped = stop_training_job(args.key, wait_s=args.wait)
    print(f"stopped Ray job {stopped}" if stopped else f"no running Ray job for key {args.key}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.eval.evaluate import run_evaluation

    if args.per_prompt < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--per-prompt and --steps must be >= 1")
    from mlflow.exceptions import MlflowException

    try:
        evaluation = run_evaluation(args.model, out_dir=args.out, prompts=args.prompts, per_prompt=args.per_prompt,
                                    steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed)
    except MlflowException as e:
        raise UsageError(f"cannot evaluate {args.model} through MLflow: {e.message}") from None
    print(evaluation.table())
    print(f"images: {evaluation.grid_path} (a row per prompt)")
    if evaluation.run_id:
        tagged = evaluation.model_version and f"; tags eval.* on {evaluation.model_name} v{evaluation.model_version}"
        print(f"recorded: metrics eval_* on MLflow run {evaluation.run_id}{tagged or ''}")
    return 0


def cmd_flow(args: argparse.Namespace) -> int:
    build_run_config(args)  # validate before Prefect is even imported
    if args.vae_config:
        from training.config import load_config

        if load_config(args.vae_config).task != "vae":
            raise UsageError(f"--vae-config {args.vae_config} is not a `task: vae` config")
    if args.source:
        from data_prep import storage

        storage.storage_for(args.source).check_readable(args.source)
    from pipelines.flows import run_pipeline

    summary = run_pipeline(
        config_path=args.config,
        overrides=overrides_from_args(args),
        source=args.source,
        synth_n=args.synth_n,
        work_dir=args.work_dir,
        samples_per_shard=args.samples_per_shard,
        overwrite_shards=args.overwrite,
        vae_config_path=args.vae_config,
        forward_credentials=args.forward_credentials,
        latents=args.latents,
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["state"] == "COMPLETED" else 1


# --- parser -----------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML preset (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="shorthand for --set train.max_steps=N")
    p.add_argument("--num-workers", type=int, help="shorthand for --set train.num_workers=N")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--forward-credentials", action="store_true",
                   help="hand this environment's AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN and MLFLOW_TRACKING_USERNAME/"
                        "PASSWORD/TOKEN to every Ray node (through the job's runtime environment); default: each node "
                        "uses its own credentials")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    # Defaults come from ShardConfig, so the CLI and the library cannot drift apart.
    from data_prep.shard import ShardConfig

    d = ShardConfig.__dataclass_fields__
    g = p.add_argument_group("input and output")
    g.add_argument("--source", help="image folder with .txt/.json captions, a .csv/.tsv/.jsonl/.parquet table of "
                                    "paths or URLs, or existing .tar shards; local or s3://")
    g.add_argument("--output", help="dataset folder or s3://bucket/prefix; a re-run adds only new items")
    g.add_argument("--source-format", default="auto", choices=["auto", "folder", "table", "shards"])
    g.add_argument("--url-column", help="table column with the image path or URL (default: url, image, path, ...)")
    g.add_argument("--caption-column", help="table column with the caption (default: caption, text, prompt)")
    g.add_argument("--caption-field", default=d["caption_field"].default,
                   help="caption field of .json sidecars and json members (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true", help="replace the dataset instead of adding a new part")
    g = p.add_argument_group("processing")
    g.add_argument("--resolution", type=int, default=d["resolution"].default)
    g.add_argument("--resize-mode", default=d["resize_mode"].default, choices=["center_crop", "pad", "none"])
    g.add_argument("--image-format", default=d["image_format"].default, choices=["jpg", "png", "webp"])
    g.add_argument("--quality", type=int, default=d["quality"].default, help="JPEG/WebP quality 1-100")
    g.add_argument("--jpeg-subsampling", default=d["jpeg_subsampling"].default, choices=["4:4:4", "4:2:2", "4:2:0"],
                   help="JPEG chroma subsampling (default: %(default)s, full colour resolution)")
    g.add_argument("--min-size", type=int, default=d["min_size"].default, help="skip images smaller than this")
    g.add_argument("--max-pixels", type=int, default=d["max_pixels"].default,
                   help="skip images whose header claims more pixels (decompression bombs)")
    g.add_argument("--max-image-bytes", type=int, default=d["max_image_bytes"].default)
    g.add_argument("--keep-empty-captions", action="store_true", help="keep items with empty captions")
    g.add_argument("--allow-private-hosts", action="store_true",
                   help="fetch table URLs from loopback, private and link-local hosts (refused by default)")
    g.add_argument("--allow-root", action="append", default=[], metavar="PATH",
                   help="a folder or s3:// prefix a table's paths may point into besides its own folder (repeatable)")
    g.add_argument("--follow-symlinks", action="store_true",
                   help="read symlinked folders of a local folder source (default: count each as a skip)")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    g.add_argument("--keep-url-query", action="store_true",
                   help="store URL query strings in source ids (default: dropped; signatures are credentials)")
    g = p.add_argument_group("shards and speed")
    g.add_argument("--samples-per-shard", type=int, default=d["samples_per_shard"].default)
    g.add_argument("--max-shard-bytes", type=int, default=d["max_shard_bytes"].default, help="0: no byte limit")
    g.add_argument("--processes", type=int, default=d["processes"].default, help="0: one per CPU core")
    g.add_argument("--ray-address", help="run the tasks on this Ray cluster (Ray Data) instead of local processes")
    g.add_argument("--fetch-timeout", type=float, default=d["fetch_timeout"].default)
    g.add_argument("--fetch-retries", type=int, default=d["fetch_retries"].default)
    g.add_argument("--read-threads", type=int, default=d["read_threads"].default)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from training.models.sampling import SAMPLERS

    p.add_argument("--sampler", choices=SAMPLERS, help="default: the one the model's pipeline folder records")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recorded default)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's recorded "
                                                  "default)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ldmflow", description=__doc__.splitlines()[0])
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic shapes image-caption set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("shard", help="images + captions (folder, table, URLs, shards; local or s3://) -> "
                                     "WebDataset shards + manifest; `shard verify PATH` checks a dataset")
    add_shard_args(p)
    p.set_defaults(func=cmd_shard, shard_command=None)
    verify = p.add_subparsers(dest="shard_command").add_parser(
        "verify", help="check every shard of a dataset (local or s3://) against its manifest; exit 1 on mismatch")
    verify.add_argument("path", help="dataset folder or s3:// prefix (index.json), or one part (manifest.json)")

    p = sub.add_parser("train", help="Ray Train + DeepSpeed training, tracked and registered in MLflow")
    add_train_args(p)
    p.add_argument("--data", help="dataset folder or s3:// prefix written by `ldmflow shard`")
    p.add_argument("--storage", help="where Ray Train keeps checkpoints: a path every node sees or "
                   "s3://bucket/prefix (default: $LDMFLOW_STORAGE, else runs/ray)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its latest verified "
                   "checkpoint (after its driver died, or with a higher --max-steps)")
    p.add_argument("--allow-new-data", action="store_true", help="with --resume: continue on the run's dataset "
                   "although it changed since (from the next epoch); refused otherwise")
    p.add_argument("--no-register", action="store_true", help="train only; skip export and registration")
    p.add_argument("--promote", action="store_true", help="after registration, run the gate (the config's gate: "
                   "section): the new version becomes champion only if it beats the current one")
    g = p.add_argument_group("as a Ray Job (the driver runs on the cluster: $RAY_ADDRESS, http://host:8265)")
    g.add_argument("--submit", action="store_true", help="train as a Ray Job named by --job-key; run again with "
                   "the same key to re-attach to it, take its result, or resume it after it failed")
    g.add_argument("--job-key", help="the job's identity (default: the Prefect flow run this runs in)")
    g.add_argument("--timeout", type=float, help="stop the job after this many seconds")
    g.add_argument("--stop-grace", type=float, default=120.0, help="seconds between a stop's SIGTERM and SIGKILL "
                   "(Ray's default is 3; default here: %(default)s)")
    p.set_defaults(func=cmd_train, default_config=DEFAULT_CONFIG)

    p = sub.add_parser("encode", help="raw shards -> latent shards (VAE posterior + text states) of the config's "
                                      "frozen encoders, on Ray workers; `train --data` then reads them")
    p.add_argument("--data", required=True, help="raw dataset folder or s3:// prefix written by `ldmflow shard`")
    p.add_argument("--out", required=True, help="latent dataset folder or s3:// prefix; a rerun finishes what an "
                                                "interrupted one left")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the `ldm` preset that will train on them (its "
                                                            "model.vae and model.text_encoder; default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--workers", type=int, help="Ray workers (default: train.num_workers; 0: in this process)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per encoder forward (default: %(default)s)")
    p.set_defaults(func=cmd_encode, max_steps=None, num_workers=None)

    p = sub.add_parser("train-vae", help="train the first-stage AutoencoderKL (a `task: vae` config) through the "
                                         "same Ray + DeepSpeed loop; saves a diffusers VAE folder")
    add_train_args(p)
    p.set_defaults(config="configs/shapes-vae.yaml", default_config="configs/shapes-vae.yaml")
    p.add_argument("--data", help="dataset folder or s3:// prefix written by `ldmflow shard`")
    p.add_argument("--storage", help="where Ray Train keeps checkpoints (as for `train`)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its latest verified checkpoint")
    p.add_argument("--allow-new-data", action="store_true", help="with --resume: continue on changed data")
    p.set_defaults(func=cmd_train, no_register=False, promote=False)

    from pipelines.consumer_cli import add_consumer_commands

    add_consumer_commands(sub, add_sampling_args)

    p = sub.add_parser("evaluate", help="score caption adherence (colour, shape, background) of a model on held-out "
                                        "synthetic prompts; record it in MLflow")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                                                   "or a pipeline folder")
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts (default: %(default)s)")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="chooses the prompts; image j starts from seed + j")
    p.add_argument("--out", help="where grid.png and results.json go (default: runs/eval/<model>)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("flow", help="run the whole chain as one Prefect flow: (synth) -> shard -> train -> register")
    add_train_args(p)
    p.add_argument("--source", help="image folder with captions; omitted: a synthetic set is generated")
    p.add_argument("--synth-n", type=int, default=64, help="synthetic samples when no --source")
    p.add_argument("--work-dir", help="where raw data and shards go (default: <runs dir>/work; LDMFLOW_RUNS_DIR "
                                      "moves the runs dir)")
    p.add_argument("--samples-per-shard", type=int, help="default: the shard config's sizing (1000 samples or 1 GiB "
                                                          "per tar, the size readers stream well)")
    p.add_argument("--overwrite", action="store_true", help="replace shards from an earlier run")
    p.add_argument("--latents", action="store_true", help="encode the shards (`ldmflow encode`, into "
                   "<work dir>/latents) once the VAE is known, and train the LDM from the latent shards")
    p.add_argument("--vae-config", help="a `task: vae` config (e.g. shapes-vae): train the VAE on the shards "
                                        "first and the LDM on it")
    p.set_defaults(func=cmd_flow)
    p = sub.add_parser("job", help="training Ray Jobs: `job stop KEY` stops the job of that key")
    job = p.add_subparsers(dest="job_command", required=True).add_parser("stop", help="stop the key's running job")
    job.add_argument("key", help="the --job-key (or flow-run id) it was submitted with")
    job.add_argument("--wait", type=float, default=150.0, help="seconds to wait for it to end")
    p.set_defaults(func=cmd_job)
    add_registry_parser(sub)
    from pipelines.deploy_cli import add_deploy_commands

    add_deploy_commands(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    logging.basicConfig(level=os.environ.get("LDMFLOW_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataPrepError, DataError, EvaluationError, ModelLoadError, PromptFileError,
            TrackingUnavailable, FileNotFoundError, DeployError) as e:
        print(f"ldmflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from training.runtime.jobs import JobFailed

        if not isinstance(e, JobFailed):
            raise
        print(f"ldmflow {args.command}: {e}", file=sys.stderr)  # the job's message and last log lines
        return 1


if __name__ == "__main__":
    sys.exit(main())
