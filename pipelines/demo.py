"""``make demo``: the whole chain on the embedded default, then checks that each part worked.

Synthetic shapes (32 px) -> shards -> the VAE, then the shards' latents under it (`ldmflow encode`'s
step) -> the latent diffusion model on them, each model trained by Ray + DeepSpeed (one worker holding
both cores: configs/shapes.yaml says why) -> MLflow runs, a registered version (alias `candidate`) and
the promotion gate (configs/shapes.yaml's `gate:`), which makes it `champion` when it clears the floors
or beats the current champion on the same held-out evaluation set, all as one Prefect flow; then
`@champion` is evaluated through MLflow on held-out and seen shape x colour x background combinations
(does it draw the prompted shape in the prompted colour on the prompted background?) and generates
images. Exits non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipelines.console import quiet_third_party

quiet_third_party()  # before the flow module imports Prefect

from pipelines.flows import run_pipeline  # noqa: E402


def loss_trend(run_id: str) -> tuple[float, float]:
    """Mean logged loss over the first and the last fifth of the run."""
    from mlflow import MlflowClient

    history = sorted(MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: m.step)
    if len(history) < 2:
        raise RuntimeError(f"run {run_id} logged {len(history)} loss values; expected a history")
    k = max(1, len(history) // 5)
    first = sum(m.value for m in history[:k]) / k
    last = sum(m.value for m in history[-k:]) / k
    return first, last


def champion_version(name: str) -> str | None:
    """The version `models:/NAME@champion` points at, None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.mlops.registry import CHAMPION

    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


TARGETS = {"vae_psnr": 27.0, "colour_adherence": 0.90, "shape_adherence": 0.35}
"""Floors the demo's model must clear on prompts of training combinations (the seen set); chance is
0.10 for colours and 0.17 for shapes. The held-out combinations (compositional generalisation) are
printed beside them, not gated. These catch a broken run, not a weaker seed: the VAE's training is not
bit-repeatable across runs, and 120 images give a standard error of about 0.045. The recipe's level is
higher: the last fresh-clone run measured 28.41 dB, colour 0.983 and shape 0.817 (seen; 0.967 and
0.858 held-out), where issue 15 asks for 28 dB, 0.95 and 0.75."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes.yaml")
    p.add_argument("--vae-config", default="configs/shapes-vae.yaml", help="'' to use the config's own VAE")
    p.add_argument("--synth-n", type=int, default=4000)
    p.add_argument("--max-steps", type=int, default=None, help="LDM steps (default: the config's)")
    p.add_argument("--vae-max-steps", type=int, default=None, help="VAE steps (default: the VAE config's)")
    p.add_argument("--eval-prompts", type=int, default=30, help="held-out prompts, and as many seen ones (<= 36)")
    p.add_argument("--eval-per-prompt", type=int, default=4)
    p.add_argument("--work-dir", help="where raw data, shards and images go (default: <runs dir>/demo)")
    args = p.parse_args(argv)
    from training.locations import runs_dir

    work_dir = Path(args.work_dir) if args.work_dir else runs_dir() / "demo"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from data_prep.dataset import verify_dataset
    from training.eval.evaluate import run_evaluation
    from training.locations import setup_mlflow
    from training.mlops.generate import generate_from_registry
    from training.mlops.registry import CHAMPION

    started = time.monotonic()
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    vae_overrides = [f"train.max_steps={args.vae_max_steps}"] if args.vae_max_steps else []
    summary = run_pipeline(config_path=args.config, overrides=overrides, synth_n=args.synth_n,
                           work_dir=str(work_dir), samples_per_shard=500, overwrite_shards=True,
                           vae_config_path=args.vae_config or None, vae_overrides=vae_overrides,
                           # The demo shows training: a second `make demo` trains again rather than
                           # returning the first one's cached result.
                           refresh_cache=True,
                           # The LDM trains from latent shards: its step runs the UNet alone, and the
                           # loader reads stored latents instead of decoding PNGs.
                           latents=True)
    import ray

    if ray.is_initialized():  # training is over: its workers' last log lines print now, not after the summary
        ray.shutdown()
    checks: list[tuple[str, bool, str]] = [("Prefect flow run state", summary["state"] == "COMPLETED",
                                            f"{summary['state']} ({summary['flow_run_id']})")]
    grid = None
    if summary["state"] == "COMPLETED":
        verified = verify_dataset(summary["shards"]["output"])  # reads every byte of every shard
        checks.append(("manifest matches tars", verified.ok,
                       f"{verified.samples} samples in {verified.shards} shards"
                       + "".join(f"; {p}" for p in verified.problems[:3])))
        if "vae" in summary:
            psnr = summary["vae"]["psnr"]
            checks.append((f"VAE held-out PSNR >= {TARGETS['vae_psnr']:.0f} dB",
                           psnr is not None and psnr >= TARGETS["vae_psnr"],
                           f"{psnr:.2f} dB; scaling factor {summary['vae']['scaling_factor']:.4f}"))
        setup_mlflow()
        first, last = loss_trend(summary["run_id"])
        checks.append(("logged loss falls", last < first, f"{first:.4f} -> {last:.4f}"))
        model = summary["model"]
        gate = model["gate"]
        # What a consumer loads is @champion: this run's version when the gate promoted it, or an earlier
        # demo's that it did not beat on the same held-out set (the reason says which).
        champion = champion_version(model["name"])
        checks.append(("gate: a champion to consume", champion is not None,
                       f"v{model['version']} {'promoted' if gate['promoted'] else 'not promoted'} "
                       f"({gate['reason']}); champion: {f'v{champion}' if champion else 'none'}"))
        # With no champion (a first version under the gate's floor) the checks still show what this run's
        # version draws, by its version number: the gate check above has already failed the demo.
        uri = f"models:/{model['name']}@{CHAMPION}" if champion else f"models:/{model['name']}/{model['version']}"
        evaluation = run_evaluation(uri, prompts=args.eval_prompts, per_prompt=args.eval_per_prompt,
                                    out_dir=work_dir / "eval")
        grid = evaluation.grid_path
        print("\n" + evaluation.table())
        m = evaluation.metrics
        for attribute in ("colour", "shape"):
            key = f"{attribute}_adherence"
            checks.append((f"{attribute} adherence >= {TARGETS[key]:.2f} (seen)", m[f"seen_{key}"] >= TARGETS[key],
                           f"seen {m[f'seen_{key}']:.3f} over {m['seen_n']} images; held-out {m[key]:.3f} "
                           f"over {m['n']} images"))
        out = work_dir / "generated"
        paths = generate_from_registry(uri, "a red circle on a blue background", out, n=4)
        checks.append((f"generate from {uri}", len(paths) == 4, f"{len(paths)} PNGs in {out}"))

    width = max(len(name) for name, _, _ in checks)
    print("\nldmflow demo")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    if grid is not None:
        print(f"  sample grid (a row per prompt, also logged to MLflow): {grid}")
    print(f"  wall time {time.monotonic() - started:.0f} s")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
