"""The README's "Consuming a registered model" lines run as written (model name, output places and
step count swapped for the test's) against a real MLflow server holding a tiny model with alias
champion: the CLI lines through `ldmflow`, the Python snippet in a fresh interpreter."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pipelines.cli import main
from tests.training.mlops.consumer_fixtures import NAME  # `registered`: tests/conftest.py

ROOT = Path(__file__).resolve().parents[3]


def block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", readme, re.S)
    assert found, f"README has no block marked {marker}"
    return found.group(1).replace("ldm-tiny", NAME)


def test_readme_cli_lines_run(registered, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    commands = [shlex.split(line) for line in block("consumer-cli").replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["ldmflow", "generate"], ["ldmflow", "generate-batch"]]
    for argv in commands:
        argv = [("batch-out" if a.startswith("s3://") else a) for a in argv[1:]] + ["--steps", "2"]
        assert main(argv) == 0, argv
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4
    assert len(list((tmp_path / "batch-out").glob("*.png"))) == 8 and (tmp_path / "batch-out/index.json").is_file()


def test_readme_python_snippet_runs(registered, tmp_path):
    code = block("consumer-python").replace('"steps": 20', '"steps": 2')
    code += "\nassert images.dtype.name == 'uint8' and images.shape[0] == 1 and images.shape[-1] == 3\nprint('ok')\n"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
