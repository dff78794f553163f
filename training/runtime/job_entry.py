"""The entrypoint of a training Ray Job (`python -m training.runtime.job_entry`), run by Ray's job
supervisor on a node of the cluster: it reads its job spec from the environment (training.runtime.jobs
puts it there), trains or resumes through training.runtime.driver, and publishes what the submitter
needs in the run's storage: the MLflow run id as soon as the run exists (a retry resumes that run),
and the TrainOutcome at the end. The node needs none of the submitter's files: the spec carries the
resolved config, and data and storage are URIs every node reaches.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass

from data_prep import storage
from training.runtime import stopping

SPEC_ENV = "LDMFLOW_JOB_SPEC"

log = logging.getLogger("ldmflow.job")


@dataclass(frozen=True)
class JobSpec:
    """What one training job does. No credentials: nodes bring their own (training.runtime.cluster)."""

    submission_id: str
    key_dir: str
    """Where this caller identity's jobs publish (run.json, <submission id>.outcome.json)."""
    data: str
    storage: str
    config: dict
    """The resolved run config (training.config.RunConfig.to_dict()), for a new run."""
    resume_run_id: str | None = None
    """Set for a retry: resume this MLflow run from its latest verified checkpoint instead."""
    allow_new_data: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))


def run_file(key_dir: str) -> str:
    return storage.join(key_dir, "run.json")


def outcome_file(key_dir: str, submission_id: str) -> str:
    return storage.join(key_dir, f"{submission_id}.outcome.json")


def main() -> int:
    from training.config import config_from_dict
    from training.runtime.driver import recorded_outcome, resume, train
    from training.runtime.lease import holder_name

    logging.basicConfig(level=os.environ.get("LDMFLOW_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray's `stop_job` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (the submitter's stop
    # grace): within it the workers checkpoint the step they are at, then the driver's cleanup runs (the
    # MLflow run marked KILLED, the run's lease released). Before training starts it exits at once.
    stopping.install_sigterm(float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3")))
    spec = JobSpec.from_json(os.environ[SPEC_ENV])
    # The holder names the job, so a submitter that sees this job failed may break its lease at once
    # instead of waiting out its expiry (training.runtime.jobs).
    holder = holder_name(f"ray-job {spec.submission_id}")

    def record_run(run_id: str) -> None:
        uri = run_file(spec.key_dir)
        storage.storage_for(uri).put_bytes(uri, json.dumps({"run_id": run_id, "by": spec.submission_id}).encode())
        log.info("job %s trains MLflow run %s", spec.submission_id, run_id)

    if spec.resume_run_id and (done := recorded_outcome(spec.resume_run_id)) is not None:
        # The attempt before finished the run but was stopped before publishing its outcome.
        log.info("job %s: MLflow run %s finished already; publishing its outcome", spec.submission_id,
                 spec.resume_run_id)
        outcome = done
    elif spec.resume_run_id:
        log.info("job %s resumes MLflow run %s", spec.submission_id, spec.resume_run_id)
        outcome, _ = resume(spec.resume_run_id, allow_new_data=spec.allow_new_data, lease_holder=holder)
    else:
        outcome = train(config_from_dict(spec.config), spec.data, storage_uri=spec.storage, lease_holder=holder,
                        on_run=record_run)
    uri = outcome_file(spec.key_dir, spec.submission_id)
    storage.storage_for(uri).put_bytes(uri, outcome.to_json().encode())
    log.info("job %s finished MLflow run %s: final checkpoint %s", spec.submission_id, outcome.run_id,
             outcome.checkpoint_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
