"""Bad input stops a command with one clear line (exit 2) before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_shard_missing_source(capsys, tmp_path):
    code, err = run(capsys, "shard", "--source", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert code == 2 and "does not exist" in err and str(tmp_path / "nope") in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_shard_with_other_options_needs_overwrite(capsys, tmp_path):
    assert main(["synth", "--out", str(tmp_path / "raw"), "--n", "4", "--size", "16"]) == 0
    args = ["shard", "--source", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--resolution", "16"]) == 0
    code, err = run(capsys, *args, "--resolution", "32")
    assert code == 2 and "--overwrite" in err and "resolution=16" in err


def test_shard_s3_and_verify_input_errors(capsys, tmp_path):
    code, err = run(capsys, "shard", "--output", str(tmp_path / "out"))
    assert code == 2 and "--source and --output" in err
    code, err = run(capsys, "shard", "verify", str(tmp_path / "nothing-here"))
    assert code == 2 and "no manifest.json" in err
    code, err = run(capsys, "shard", "--source", str(tmp_path), "--output", "gs://bucket/x")
    assert code == 2 and "gs://" in err


@pytest.mark.parametrize("argv, message", [
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--set", "train.zero_stage=9"], "`train.zero_stage` must be 0-3, got 9"),
    (["--set", "train.nope=1"], "unknown config key `train.nope`"),
    (["--set", "train.batch_size"], "must look like key=value"),
    (["--max-steps", "0"], "`train.max_steps` must be >= 1, got 0"),
])
def test_train_bad_config(capsys, tmp_path, argv, message):
    argv = ["--config", TINY, *argv] if "--config" not in argv else argv
    code, err = run(capsys, "train", *argv, "--data", str(tmp_path))
    assert code == 2, err
    assert message in err


def test_train_data_problems(capsys, tmp_path):
    code, err = run(capsys, "train", "--config", TINY, "--data", str(tmp_path / "nope"))
    assert code == 2 and str(tmp_path / "nope") in err and "does not exist" in err
    code, err = run(capsys, "train", "--config", TINY, "--data", str(tmp_path))
    assert code == 2 and "no manifest.json" in err
    main(["synth", "--out", str(tmp_path / "raw"), "--n", "4", "--size", "32"])
    main(["shard", "--source", str(tmp_path / "raw"), "--output", str(tmp_path / "s32"), "--resolution", "32"])
    code, err = run(capsys, "train", "--config", TINY, "--data", str(tmp_path / "s32"))
    assert code == 2 and "are 32px but model.resolution is 64" in err


def test_missing_text_encoder_fails_before_any_run(capsys, tmp_path):
    main(["synth", "--out", str(tmp_path / "raw"), "--n", "4"])
    main(["shard", "--source", str(tmp_path / "raw"), "--output", str(tmp_path / "s64")])
    code, err = run(capsys, "train", "--config", TINY, "--data", str(tmp_path / "s64"),
                    "--set", f"model.text_encoder.name_or_path={tmp_path / 'no-clip'}")
    assert code == 2 and "model.text_encoder.name_or_path" in err


def test_unreadable_config(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage: [")
    code, err = run(capsys, "train", "--config", str(bad), "--data", str(tmp_path))
    assert code == 2 and "not readable YAML" in err


def test_flow_and_generate_inputs(capsys, tmp_path):
    code, err = run(capsys, "flow", "--config", TINY, "--source", str(tmp_path / "nope"))
    assert code == 2 and str(tmp_path / "nope") in err and "does not exist" in err
    code, err = run(capsys, "flow", "--config", "shapes", "--vae-config", "tiny")
    assert code == 2 and "--vae-config tiny is not a `task: vae` config" in err
    code, err = run(capsys, "generate", "--model", "models:/x@candidate", "--prompt", "p", "--out", str(tmp_path),
                    "--n", "0")
    assert code == 2 and "--n and --steps must be >= 1" in err


def test_synth_bad_count(capsys, tmp_path):
    code, err = run(capsys, "synth", "--out", str(tmp_path), "--n", "0")
    assert code == 2 and "n must be" in err


def test_generate_unknown_model(capsys, tmp_path):
    code, err = run(capsys, "generate", "--model", "models:/no-such-model@candidate", "--prompt", "p",
                    "--out", str(tmp_path / "out"))
    assert code == 2 and "models:/no-such-model@candidate: not found" in err
    assert not (tmp_path / "out").exists()


def test_s3_uris_never_become_local_folders(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "synth", "--out", "s3://bucket/raw", "--n", "2")
    assert code == 2 and "s3://bucket/raw is an S3 URI" in err
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" anywhere


def test_train_and_train_vae_refuse_each_others_configs(capsys, tmp_path):
    code, err = run(capsys, "train-vae", "--config", TINY, "--data", str(tmp_path))
    assert code == 2 and "is a `ldm` config: run it with `ldmflow train`" in err and len(err.splitlines()) == 1
    code, err = run(capsys, "train", "--config", "shapes-vae", "--data", str(tmp_path))
    assert code == 2 and "is a `vae` config: run it with `ldmflow train-vae`" in err
    code, err = run(capsys, "train-vae", "--set", "model.vae.pretrained=/some/vae", "--data", str(tmp_path))
    assert code == 2 and "model.vae.pretrained" in err and "null for `train-vae`" in err
