"""A stand-in for `pipelines/flows.py:retrain_flow` while a checkout lacks it: the same parameters the
retrain deployment in prefect.yaml passes, and nothing else. The stack test deploys it (to a pool no
worker polls) only to see which flow runs the new-data trigger creates; the real retrain is tested end
to end elsewhere."""

from prefect import flow


@flow(name="ldm-retrain")
def retrain_flow(source: str, dataset: str, config_path: str = "configs/tiny.yaml", model_name: str = "ldm-tiny",
                 from_scratch: bool = False) -> dict:
    return {"source": source, "dataset": dataset, "config_path": config_path, "model_name": model_name,
            "from_scratch": from_scratch}
