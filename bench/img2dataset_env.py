"""img2dataset, the data-prep baseline, in a venv of its own: `.venv-img2dataset/` at the repo root.

img2dataset 1.47.0 requires webdataset<0.3, pandas<3 and albumentations<2; the project runs webdataset 1.x
and pandas 3, so the two cannot share `.venv`. The versions installed are the ones pinned in
`bench/img2dataset-constraints.txt`, which resolve on this package mirror without pulling torch.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

IMG2DATASET_VERSION = "1.47.0"
VENV_DIR = ".venv-img2dataset"
CONSTRAINTS = Path(__file__).with_name("img2dataset-constraints.txt")
MARKER = ".installed"
"""Written last, holding the constraints' sha256: a venv without it (or with other pins) is rebuilt."""


class Img2datasetEnvError(RuntimeError):
    """The img2dataset venv could not be built; the message says which step failed and how."""


def ensure_img2dataset_venv(root: str | Path) -> Path:
    """Return the python of `<root>/.venv-img2dataset`, creating it on first use (a few minutes).

    Reused as long as its marker matches the current constraints file; an interrupted or outdated
    install is wiped and redone. Raises Img2datasetEnvError naming the failed command.
    """
    venv = Path(root) / VENV_DIR
    python = venv / "bin" / "python"
    marker = venv / MARKER
    pins = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()
    if python.exists() and marker.exists() and marker.read_text().strip() == pins:
        return python

    print(f"creating {venv} for the img2dataset {IMG2DATASET_VERSION} baseline "
          f"(once, a few minutes; pins in {CONSTRAINTS.name})", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    # The base interpreter, not this venv's: the new venv must not see the project's site-packages.
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run([base, "-m", "venv", str(venv)], "create the venv")
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "-c", str(CONSTRAINTS), f"img2dataset=={IMG2DATASET_VERSION}"], "install img2dataset")
    _run([str(python), "-c", "import img2dataset"], "import img2dataset")
    marker.write_text(pins + "\n")
    print(f"{venv} ready", flush=True)
    return python


def _run(cmd: list[str], step: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise Img2datasetEnvError(f"could not {step}: {e}") from e
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        tail = [line for line in lines if line.startswith("ERROR")][-3:] or lines[-5:]
        raise Img2datasetEnvError(
            f"could not {step} (exit {done.returncode}): {' | '.join(tail)}; "
            f"fix the pins in bench/{CONSTRAINTS.name} or delete {VENV_DIR}/ and rerun"
        )
