"""`ldmflow generate` and `generate-batch` as a consumer runs them: against a real MLflow server with a
tiny registered model (alias champion), every URI form, one clear line for every way naming the model
can go wrong, and a batch that stops halfway and resumes to exactly what one run writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipelines.cli import main
from tests.mlflow_server import free_port
from tests.training.mlops.consumer_fixtures import NAME  # `registered`: tests/conftest.py

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a blue triangle"]


@pytest.fixture
def server(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    return registered


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_generate_from_every_uri_form(server, tmp_path, capsys):
    forms = {"alias": f"models:/{NAME}@champion", "version": f"models:/{NAME}/{server.version}",
             "run": f"runs:/{server.run_id}/model", "folder": str(server.folder)}
    images = {}
    for form, uri in forms.items():
        code, out, err = run(capsys, "generate", "--model", uri, "--prompt", PROMPTS[0], "--out", tmp_path / form,
                             "--n", 2, "--seed", 5, "--steps", 2)
        assert code == 0, err
        paths = out.split()
        assert [Path(p).name for p in paths] == ["image-00005.png", "image-00006.png"]
        images[form] = [Path(p).read_bytes() for p in paths]
    # One model behind four names: the same seeds give the same bytes.
    assert images["alias"] == images["version"] == images["run"] == images["folder"]
    assert images["alias"][0] != images["alias"][1]


@pytest.mark.parametrize("uri, expected", [
    (f"models:/{NAME}-nope@champion", "not found"),
    (f"models:/{NAME}@nosuchalias", "not found"),
    (f"models:/{NAME}/999", "not found"),
    ("models:/", "is not a model URI"),
    (f"models:/{NAME}@", "is not a model URI"),
    ("model:/x@champion", "is not a model URI"),
    ("runs:/abc", "is not a model URI"),
])
def test_generate_names_a_bad_model_in_one_line(server, tmp_path, capsys, uri, expected):
    code, _, err = run(capsys, "generate", "--model", uri, "--prompt", "x", "--out", tmp_path)
    assert code == 2
    assert expected in err and uri in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_generate_against_a_down_server_answers_in_seconds(tmp_path, capsys, monkeypatch):
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    start = time.monotonic()
    code, _, err = run(capsys, "generate", "--model", f"models:/{NAME}@champion", "--prompt", "x", "--out", tmp_path)
    elapsed = time.monotonic() - start
    assert code == 2 and "cannot reach the MLflow tracking server" in err and down in err
    assert len(err.splitlines()) == 1
    assert elapsed < 30, f"a down server took {elapsed:.0f} s to report"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_generate_batch_stopped_halfway_resumes_to_what_one_run_writes(server, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    common = ["generate-batch", "--model", f"models:/{NAME}@champion", "--prompts", prompts, "--per-prompt", 2,
              "--seed", 11, "--steps", 2]

    code, out, err = run(capsys, *common, "--out", tmp_path / "once", "--batch-size", 4)
    assert code == 0, err
    once = _files(tmp_path / "once")
    names = [f"p{i:05d}-{j:03d}.png" for i in range(3) for j in range(2)]
    assert sorted(once) == sorted([*names, "index.json"])

    # Stopped after 3 images (mid-request), then rerun.
    code, out, err = run(capsys, *common, "--out", tmp_path / "twice", "--batch-size", 4, "--limit", 3)
    assert code == 0, err
    assert "3 images written, 0 already there" in out and "rerun" in out
    assert sorted(_files(tmp_path / "twice")) == names[:3]  # no index until every image exists
    code, out, err = run(capsys, *common, "--out", tmp_path / "twice", "--batch-size", 4)
    assert code == 0, err
    assert "3 images written, 3 already there, 6 in all" in out
    assert _files(tmp_path / "twice") == once  # byte for byte, index included

    index = json.loads(once["index.json"])
    assert [(e["file"], e["prompt"], e["seed"]) for e in index["images"]] == [
        (f"p{i:05d}-{j:03d}.png", PROMPTS[i], 11 + i * 2 + j) for i in range(3) for j in range(2)]

    # A third run has nothing to do and does not load the model.
    code, out, _ = run(capsys, *common, "--out", tmp_path / "twice")
    assert code == 0 and "0 images written, 6 already there" in out


def test_generate_batch_writes_to_s3(server, s3_bucket, tmp_path, capsys):
    from data_prep import storage

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,id\n" + "".join(f'"{p}",{i}\n' for i, p in enumerate(PROMPTS)))
    out_uri = f"s3://{s3_bucket}/batch/out"
    common = ["generate-batch", "--model", f"models:/{NAME}/{server.version}", "--prompts", prompts,
              "--steps", 2, "--seed", 3, "--out", out_uri]
    code, out, err = run(capsys, *common, "--limit", 1)
    assert code == 0, err
    code, out, err = run(capsys, *common)
    assert code == 0, err
    assert "2 images written, 1 already there" in out
    local = tmp_path / "local"
    assert run(capsys, *common[:-1], local)[0] == 0
    s3 = storage.storage_for(out_uri)
    listed = {o.name: s3.read_bytes(o.uri) for o in s3.list(out_uri)}
    assert listed == _files(local)


def test_generate_batch_bad_prompt_files(server, tmp_path, capsys):
    table = tmp_path / "p.csv"
    table.write_text("caption\nx\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for path, expected in [(table, "no `prompt` column"), (empty, "holds no prompts"),
                           (tmp_path / "missing.txt", "missing.txt")]:
        code, _, err = run(capsys, "generate-batch", "--model", str(server.folder), "--prompts", path,
                           "--out", tmp_path / "o")
        assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    code, _, err = run(capsys, "generate-batch", "--model", str(server.folder), "--prompts", empty,
                       "--out", tmp_path / "o", "--per-prompt", 0)
    assert code == 2 and "--per-prompt must be >= 1" in err
