"""A registered model carries its own sampling code (training.models.sampling through MLflow
code_paths, under a name unique to its content), so it loads where this project is not installed,
and two versions with different code loaded in one process each run their own (mlflow/mlflow#12377:
code_paths go on sys.path and a module stays in sys.modules, so equal names would share the first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.training.tiny_pipeline import save_tiny_pipeline
from training.locations import setup_mlflow, tracking_uri
from training.mlops import registry
from training.mlops.registry import register_pipeline, shipped_module_name
from training.mlops.tracking import ensure_experiment
from training.models import sampling
from training.models.sampling import SamplerDefaults

NAME = "ldm-registry-test"

# Run in a fresh interpreter: importing this project (or data_prep, or pipelines) is an error there,
# as on a consumer's machine that installed only what the model's requirements list.
CONSUMER = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("training", "data_prep", "pipelines"):
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, NoProject())
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    out = {}
    for uri in sys.argv[1:]:
        model = mlflow.pyfunc.load_model(uri)
        images = model.predict(pd.DataFrame({"prompt": ["a red circle on a blue background"]}),
                               params={"seed": 3, "steps": 2})
        out[uri] = images.tolist()
    out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("training", "data_prep"))
    out["sampling_modules"] = sorted(m for m in sys.modules if m.startswith("ldmflow_sampling_"))
    print(json.dumps(out))
""")


def consume(*uris: str) -> dict:
    """CONSUMER's output for the model `uris`, loaded in that order in one fresh process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    proc = subprocess.run([sys.executable, "-c", CONSUMER, *uris], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(tracking_uri().removeprefix("sqlite:///")).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["project_modules"] == []
    return out


def register(folder: Path, experiment: str) -> registry.RegisteredVersion:
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    return register_pipeline(run.info.run_id, folder, NAME, {})


def test_two_versions_with_different_sampling_code_load_side_by_side_without_the_project(tmp_path, monkeypatch):
    setup_mlflow()
    experiment = ensure_experiment("ldmflow-registry-test")
    folder = save_tiny_pipeline(tmp_path / "pipeline", SamplerDefaults(steps=2))
    first = register(folder, experiment)

    # Version 2 ships another sampling module: the same code, but its images come out inverted.
    changed = tmp_path / "sampling.py"
    changed.write_text(Path(sampling.__file__).read_text() + textwrap.dedent("""

        _generate = generate_images


        def generate_images(*args, **kwargs):
            return 255 - _generate(*args, **kwargs)
        """))
    monkeypatch.setattr(registry, "SAMPLING_CODE", changed)
    second = register(folder, experiment)
    assert shipped_module_name(changed) != shipped_module_name(Path(sampling.__file__))

    # Each version's MLmodel names its own module, and its code/ folder holds it.
    for version, code in ((first, Path(sampling.__file__)), (second, changed)):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}", dst_path=str(
            tmp_path / f"v{version.version}")))
        meta = yaml.safe_load((local / "MLmodel").read_text())
        module = meta["flavors"]["python_function"]["config"]["sampling_module"]
        assert module == shipped_module_name(code)
        assert (local / "code" / f"{module}.py").read_bytes() == code.read_bytes()

    out = consume(first.uri, second.uri)
    assert out["sampling_modules"] == sorted({shipped_module_name(Path(sampling.__file__)),
                                              shipped_module_name(changed)})
    one, two = (np.array(out[v.uri], dtype=np.uint8) for v in (first, second))
    assert one.shape == (1, 32, 32, 3) and one.std() > 1
    assert np.array_equal(two, 255 - one)  # each version ran its own code in the one process


BEFORE_THE_MOVE = "67b837832394a392a2246696858dd56153cca13d"
"""The last commit with the flat training/ folder, whose pyfunc_model.py carried its own sampler code."""


# The flat layout logged its model without an input example, as this does.
@pytest.mark.filterwarnings("ignore:.*An input example was not provided")
def test_a_version_registered_before_the_move_loads_beside_a_new_one(tmp_path):
    """Versions registered by the flat layout (a self-contained pyfunc file, no code_paths) still
    load and generate, in the same process as a version registered now, and agree with it."""
    root = Path(__file__).resolve().parents[3]
    old = subprocess.run(["git", "show", f"{BEFORE_THE_MOVE}:training/pyfunc_model.py"], cwd=root,
                         capture_output=True, text=True)
    assert old.returncode == 0, f"this test reads the old file from git history: {old.stderr}"
    old_code = tmp_path / "pyfunc_model.py"
    old_code.write_text(old.stdout)

    setup_mlflow()
    folder = save_tiny_pipeline(tmp_path / "pipeline", SamplerDefaults(steps=2))
    with mlflow.start_run(experiment_id=ensure_experiment("ldmflow-registry-test")):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(old_code), artifacts={"pipeline": str(folder)},
                                       signature=registry.signature(SamplerDefaults(steps=2)),
                                       pip_requirements=registry.pip_requirements())
    legacy = mlflow.register_model(info.model_uri, "ldm-registry-legacy")
    new = register(folder, ensure_experiment("ldmflow-registry-test"))

    legacy_uri = f"models:/ldm-registry-legacy/{legacy.version}"
    out = consume(legacy_uri, new.uri)
    before, now = (np.array(out[uri], dtype=np.uint8) for uri in (legacy_uri, new.uri))
    assert before.shape == (1, 32, 32, 3) and before.std() > 1
    assert np.array_equal(before, now)  # the same pipeline, the same sampler code: the same image
