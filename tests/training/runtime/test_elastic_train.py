"""A run written by 2 workers resumes on 1 (`--resume RUN_ID --num-workers 1`): DeepSpeed's state goes
through a universal checkpoint, the data position of both old ranks is re-split over the new one,
and within every epoch each sample is trained on exactly once, across the change.

The keys come from the runs' sample logs (LDMFLOW_SAMPLE_LOG), written by the real Ray workers."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.training.run_logs import sample_log

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SAMPLES = 36
FIRST_STEPS = 3
"""2 workers x batch 8: 48 samples, so the switch lands inside the second epoch."""
TOTAL_STEPS = 8
"""Then 1 worker accumulating 2 micro-batches of 8 for 5 steps (train.elastic_batch=global keeps the
global batch of 16): 80 samples, so epochs 1 and 2 complete on the one worker."""


def logged(folder: Path) -> list[dict]:
    return [record for _, record in sample_log(folder)]


def test_resume_on_fewer_workers_reads_every_sample_once_per_epoch(tmp_path, monkeypatch, capsys):
    import ray
    from mlflow import MlflowClient

    from data_prep.dataset import read_dataset
    from data_prep.shard import ShardConfig, build_shards
    from data_prep.synth import generate_synthetic
    from pipelines.cli import main
    from training.checkpoint.verify import read_state

    generate_synthetic(tmp_path / "raw", SAMPLES, seed=6)
    build_shards(ShardConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "shards"), samples_per_shard=5,
                             progress=False))  # 8 shards, the last of 1: uneven, and not a multiple of the ranks
    assert read_dataset(str(tmp_path / "shards")).total_samples == SAMPLES

    # Both runs on one local Ray, as two jobs on a cluster would be (the resume only needs the first
    # run's storage and MLflow run, not its Ray); starting and stopping a second Ray cost ~10 s.
    try:
        monkeypatch.setenv("LDMFLOW_SAMPLE_LOG", str(tmp_path / "log-2"))
        assert main(["train", "--data", str(tmp_path / "shards"), "--no-register", "--max-steps", str(FIRST_STEPS),
                     "--set", "train.checkpoint_every=3", "--set", "train.log_every=1",
                     "--set", "train.loader_workers=1", "--set", "tracking.run_name=elastic"]) == 0
        run_id = capsys.readouterr().out.split("MLflow run ", 1)[1].split(";")[0]

        monkeypatch.setenv("LDMFLOW_SAMPLE_LOG", str(tmp_path / "log-1"))
        assert main(["train", "--resume", run_id, "--no-register", "--max-steps", str(TOTAL_STEPS),
                     "--num-workers", "1"]) == 0
    finally:
        ray.shutdown()

    before, after = logged(tmp_path / "log-2"), logged(tmp_path / "log-1")
    assert {r["rank"] for r in before} == {0, 1} and {r["rank"] for r in after} == {0}
    assert max(r["step"] for r in before) == FIRST_STEPS and min(r["step"] for r in after) == FIRST_STEPS + 1
    by_epoch: dict[int, Counter] = defaultdict(Counter)
    for record in before + after:
        for key, epoch in zip(record["keys"], record["epochs"]):
            by_epoch[epoch][key] += 1
    complete = [e for e in sorted(by_epoch) if sum(by_epoch[e].values()) == SAMPLES]
    assert complete[:3] == [0, 1, 2], {e: sum(c.values()) for e, c in by_epoch.items()}
    for epoch, counts in by_epoch.items():
        assert max(counts.values()) == 1, f"epoch {epoch} repeated {[k for k, n in counts.items() if n > 1]}"
    assert all(set(by_epoch[e]) == set(by_epoch[0]) for e in complete)

    client = MlflowClient()
    steps = Counter(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == Counter(range(1, TOTAL_STEPS + 1))
    final = read_state(client.get_run(run_id).data.tags["checkpoint"], verify_hashes=True)
    assert final.step == TOTAL_STEPS and final.world_size == 1
    assert final.samples_seen == TOTAL_STEPS * 16 and final.global_batch == 16  # the global batch kept
    assert sum(len(r["keys"]) for r in after) == (TOTAL_STEPS - FIRST_STEPS) * 16
