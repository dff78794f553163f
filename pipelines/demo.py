"""``make demo``: the whole chain on the embedded default, then checks that each part worked.

Synthetic data -> shards -> Ray + DeepSpeed training (2 workers) -> MLflow run and registered model,
all as one Prefect flow; then the registered model generates images through MLflow. Exits non-zero
when any check fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--synth-n", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--work-dir", default="runs/demo")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from data_prep.dataset import verify_dataset
    from training.sampling import generate_from_registry
    from training.tracking import setup_mlflow

    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    summary = run_pipeline(config_path=args.config, overrides=overrides, synth_n=args.synth_n,
                           work_dir=args.work_dir, samples_per_shard=64, overwrite_shards=True)
    checks: list[tuple[str, bool, str]] = [("Prefect flow run state", summary["state"] == "COMPLETED",
                                            f"{summary['state']} ({summary['flow_run_id']})")]
    if summary["state"] == "COMPLETED":
        verified = verify_dataset(summary["shards"]["output"])  # reads every byte of every shard
        checks.append(("manifest matches tars", verified.ok,
                       f"{verified.samples} samples in {verified.shards} shards"
                       + "".join(f"; {p}" for p in verified.problems[:3])))
        setup_mlflow()
        first, last = loss_trend(summary["run_id"])
        checks.append(("logged loss falls", last < first, f"{first:.4f} -> {last:.4f}"))
        uri = summary["model"]["uri"]
        paths = generate_from_registry(uri, "a red circle on a blue background", Path(args.work_dir) / "generated",
                                       n=4, steps=20)
        checks.append((f"generate from {uri}", len(paths) == 4, f"{len(paths)} PNGs in {paths[0].parent}"))

    width = max(len(name) for name, _, _ in checks)
    print("\nldmflow demo")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
