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
    for version in sys.argv[1:]:
        model = mlflow.pyfunc.load_model(f"models:/%s/{version}")
        images = model.predict(pd.DataFrame({"prompt": ["a red circle on a blue background"]}),
                               params={"seed": 3, "steps": 2})
        out[version] = images.tolist()
    out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("training", "data_prep"))
    out["sampling_modules"] = sorted(m for m in sys.modules if m.startswith("ldmflow_sampling_"))
    print(json.dumps(out))
""" % NAME)


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

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    proc = subprocess.run([sys.executable, "-c", CONSUMER, first.version, second.version], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["project_modules"] == []
    assert out["sampling_modules"] == sorted({shipped_module_name(Path(sampling.__file__)),
                                              shipped_module_name(changed)})
    one, two = (np.array(out[v], dtype=np.uint8) for v in (first.version, second.version))
    assert one.shape == (1, 32, 32, 3) and one.std() > 1
    assert np.array_equal(two, 255 - one)  # each version ran its own code in the one process
