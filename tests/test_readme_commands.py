"""Every command in the README's platform sections (Quickstart, Running on a cluster, Scheduling retraining,
Consuming a registered model) is run by a named test: the map below says which. A command added to one of
those sections without a test, or a test renamed away, fails here; `make` targets resolve (`make -n`)."""

from __future__ import annotations

import ast
import os
import subprocess

import pytest

from tests.readme_blocks import ROOT, section_commands

STACK_TEST = "tests/infra/test_local_stack.py::test_readme_running_on_a_cluster_lines_run"
CONSUMER_CLI = "tests/training/mlops/test_consumer_readme.py::test_readme_cli_lines_run"
SERVE = "tests/training/mlops/test_serve.py::test_rest_requests_get_images_and_bad_requests_a_400_with_a_clear_message"
MAKE = "tests/test_readme_commands.py::test_make_targets_resolve"

COVERED: dict[str, dict[str, str]] = {
    "Quickstart": {
        "make demo": MAKE,
        "make test": MAKE,
    },
    "Running on a cluster": {
        "infra/local/stack up": STACK_TEST,
        'eval "$(infra/local/stack env)"': STACK_TEST,
        "ldmflow deploy": STACK_TEST,
        "ldmflow synth --out data/incoming --n 256": STACK_TEST,
        "ldmflow run retrain --param source=$PWD/data/incoming --param dataset=s3://ldm-data/datasets/main":
            STACK_TEST,
        "ldmflow train --submit --job-key tiny-1 --config configs/tiny.yaml --data s3://ldm-data/datasets/main":
            STACK_TEST,
        "ldmflow job stop tiny-1": STACK_TEST,
    },
    "Scheduling retraining": {
        "ldmflow run watch-source --param source=$PWD/data/incoming --param dataset=s3://ldm-data/datasets/main":
            STACK_TEST,
        "ldmflow deploy --only retrain": STACK_TEST,
    },
    "Consuming a registered model": {
        'ldmflow generate --model models:/ldm-tiny@champion --prompt "a red circle on a blue background" --n 4 '
        "--out gen/": CONSUMER_CLI,
        "ldmflow generate-batch --model models:/ldm-tiny@champion --prompts prompts.txt --out s3://bucket/gen/ "
        "--per-prompt 4 --seed 0 --batch-size 8": CONSUMER_CLI,
        # Run by test_serve as the same command and request, not read from the README.
        "mlflow models serve -m models:/ldm-tiny@champion --env-manager local -h 127.0.0.1 -p 5001": SERVE,
        "curl -s -X POST http://127.0.0.1:5001/invocations": SERVE,
    },
}
"""Section -> README command -> the test that runs it. A `curl` entry is matched by its start (the body follows)."""


def covering(command: str, commands: dict[str, str]) -> str | None:
    if command in commands:
        return commands[command]
    return next((test for known, test in commands.items() if known.startswith("curl") and command.startswith(known)),
                None)


@pytest.mark.parametrize("section", sorted(COVERED))
def test_every_command_in_the_section_has_a_test(section):
    found = section_commands(section)
    assert found, f"README section '## {section}' has no shell block"
    uncovered = [c for c in found if covering(c, COVERED[section]) is None]
    assert not uncovered, f"README '## {section}' commands no test runs (add one, and its entry in COVERED): {uncovered}"
    stale = [known for known in COVERED[section] if not any(c == known or c.startswith(known) for c in found)]
    assert not stale, f"COVERED lists commands no longer in README '## {section}': {stale}"


def test_every_mapped_test_exists():
    for test_id in {t for commands in COVERED.values() for t in commands.values()}:
        path, name = test_id.split("::")
        tree = ast.parse((ROOT / path).read_text())
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, test_id


def test_make_targets_resolve():
    """The Quickstart's `make` lines: the Makefile has each target and `make -n` resolves it to the command that
    does the work (nothing is run)."""
    does = {"demo": "-m pipelines.demo", "test": "-m pytest"}
    targets = [c.split()[1] for c in section_commands("Quickstart") if c.startswith("make ")]
    assert targets == ["demo", "test"]
    for target in targets:
        # Under `make test` (as CI runs it) the outer make's MAKEFLAGS and MAKELEVEL would have this make print
        # "Entering/Leaving directory" lines around the recipe; this test reads the recipe as a user's shell sees it.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        proc = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert does[target] in proc.stdout.splitlines()[-1], proc.stdout


def test_blocks_are_read_as_a_shell_reads_them():
    """Continuations join, a newline inside quotes stays in its command, comments and blank lines go, and only
    shell-tagged blocks count (an untagged block is output)."""
    from tests.readme_blocks import commands, section_commands

    block = ('a --x 1 \\\n    --y 2   # why\n\n# a comment line\ncurl -d \'{"k": 1,\n  "j": "#2"}\' url\n'
             'eval "$(stack env)"  # exports\n')
    assert commands(block) == ["a --x 1 --y 2", 'curl -d \'{"k": 1,\n  "j": "#2"}\' url', 'eval "$(stack env)"']
    text = "## One\n```bash\nmake x\n```\n```\nnot a command\n```\n## Two\n```python\nprint(1)\n```\n"
    assert section_commands("One", text) == ["make x"] and section_commands("Two", text) == []
