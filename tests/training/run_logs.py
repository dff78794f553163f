"""What the Ray training tests read back from a run: its MLflow run by name, and the sample log its
workers write (LDMFLOW_SAMPLE_LOG; see training.runtime.metrics.SampleLog for the format)."""

from __future__ import annotations

import json
from pathlib import Path


def find_run(client, run_name: str, experiment: str = "ldmflow"):
    """The MLflow run named `run_name`, or None while the driver has not created it yet."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return runs[0] if runs else None


def sample_log(folder: Path) -> list[tuple[int, dict]]:
    """(worker pid, record) for every micro-batch logged in `folder`, file by file in name order."""
    return [(int(f.stem.rsplit("-", 1)[1]), json.loads(line))
            for f in sorted(folder.glob("rank-*.jsonl")) for line in f.read_text().splitlines() if line.strip()]


def last_trained_step(folder: Path) -> int:
    """The last step any rank started (the log is written line by line)."""
    return max((record["step"] for _, record in sample_log(folder)), default=0)
