"""GPUs come from the preset, never from what a cluster happens to have at launch; half precision
without a GPU is asked for by name; a request a local Ray can never place is refused with one
message before training, never left waiting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import load_config
from training.errors import ConfigError
from training.runtime.launcher import check_local_resources, check_resources

ROOT = Path(__file__).resolve().parents[3]
GPU_PRESETS = ["small", "sd15", "sdxl"]


# ------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset, gpu", [("tiny", False), ("small", True), ("sd15", True), ("sdxl", True)])
def test_presets_say_whether_they_want_gpus(preset, gpu):
    # Set in the YAML itself, not left to a default, so a preset reads as what it asks for.
    raw = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    assert raw["train"]["use_gpu"] is gpu
    cfg = load_config(preset)
    assert cfg.train.use_gpu is gpu
    assert cfg.train.allow_cpu_half_precision is False


def test_use_gpu_is_a_plain_bool():
    with pytest.raises(ConfigError, match="`train.use_gpu` must be true or false, got None"):
        load_config("sd15", ["train.use_gpu=null"])
    with pytest.raises(ConfigError, match="`train.use_gpu` must be true or false, got 'auto'"):
        load_config("sd15", ["train.use_gpu=auto"])


# --------------------------------------------------------------------- half precision on CPU


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", ["train.precision=bf16"]),
    ("tiny", ["train.precision=fp16"]),
    ("sd15", ["train.use_gpu=false"]),
    ("sdxl", ["train.use_gpu=false"]),
])
def test_half_precision_without_gpu_is_refused(preset, overrides):
    with pytest.raises(ConfigError) as err:
        load_config(preset, overrides)
    message = str(err.value)
    for key in ("train.precision", "train.use_gpu", "train.allow_cpu_half_precision"):
        assert key in message, message


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", ["train.precision=bf16"]),
    ("tiny", ["train.precision=fp16"]),
    ("sd15", ["train.use_gpu=false"]),
])
def test_half_precision_on_cpu_when_asked_for(preset, overrides):
    cfg = load_config(preset, [*overrides, "train.allow_cpu_half_precision=true"])
    assert cfg.train.precision in ("bf16", "fp16") and cfg.train.use_gpu is False


def test_cpu_run_of_a_gpu_preset_in_fp32():
    cfg = load_config("sd15", ["train.use_gpu=false", "train.precision=fp32"])
    assert cfg.train.use_gpu is False and cfg.train.precision == "fp32"


def test_zero3_bf16_cpu_smoke_overrides_need_the_flag():
    # The overrides tests/training/test_zero3_bf16.py passes: without the flag they are now
    # refused; with it (one more --set) the CPU bf16 smoke run is configured as before.
    overrides = ["train.zero_stage=3", "train.precision=bf16", "train.ema.enabled=false", "train.max_steps=3",
                 "train.batch_size=4", "tracking.run_name=zero3-bf16"]
    with pytest.raises(ConfigError, match="train.allow_cpu_half_precision"):
        load_config(ROOT / "configs/tiny.yaml", overrides)
    cfg = load_config(ROOT / "configs/tiny.yaml", [*overrides, "train.allow_cpu_half_precision=true"])
    assert (cfg.train.zero_stage, cfg.train.precision, cfg.train.use_gpu) == (3, "bf16", False)


def test_cli_refuses_half_precision_on_cpu_in_one_line(capsys, tmp_path):
    from pipelines.cli import main

    code = main(["train", "--config", "tiny", "--set", "train.precision=bf16", "--data", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.use_gpu" in err and "train.allow_cpu_half_precision" in err


# ------------------------------------------------------------------ what a local Ray can place


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_refused_on_local_ray_without_gpus(preset):
    cfg = load_config(preset)
    with pytest.raises(ConfigError) as err:
        check_local_resources(cfg, gpus=0, cpus=1024)
    message = str(err.value)
    for needle in ("train.use_gpu=true", f"train.num_workers={cfg.train.num_workers}", "0 GPUs",
                   "train.use_gpu=false", "train.allow_cpu_half_precision=true", "train.precision=fp32",
                   "RAY_ADDRESS"):
        assert needle in message, message
    assert "lower train.num_workers" not in message  # no GPU here to lower it to


def test_too_few_local_gpus_suggests_fewer_workers():
    cfg = load_config("sd15")  # 8 GPU workers
    with pytest.raises(ConfigError, match="lower train.num_workers to 2 to use the GPUs here"):
        check_local_resources(cfg, gpus=2, cpus=1024)
    check_local_resources(cfg, gpus=8, cpus=64)


def test_cpu_presets_need_no_gpu():
    check_local_resources(load_config("tiny"), gpus=0, cpus=2)
    check_local_resources(load_config("sd15", ["train.use_gpu=false", "train.precision=fp32"]), gpus=0, cpus=64)


def test_too_many_workers_for_local_cpus():
    cfg = load_config("tiny", ["train.num_workers=3"])
    with pytest.raises(ConfigError) as err:
        check_local_resources(cfg, gpus=0, cpus=2)
    message = str(err.value)
    assert "train.num_workers=3" in message and "train.cpus_per_worker=1" in message
    assert "asks for 3 CPUs but the local Ray has 2" in message


def test_both_problems_in_one_message():
    cfg = load_config("small")  # 1 GPU worker with 8 CPUs
    with pytest.raises(ConfigError) as err:
        check_local_resources(cfg, gpus=0, cpus=2)
    message = str(err.value)
    assert "0 GPUs" in message and "asks for 8 CPUs" in message and "\n" not in message


def test_local_ray_is_checked_at_once(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="train.use_gpu=true"):
        check_resources(load_config("sd15"))
    check_resources(load_config("tiny"))


def test_autoscaling_cluster_is_asked_for_the_workers_and_waited_for(monkeypatch):
    """A cluster named by RAY_ADDRESS starts without GPU nodes: the autoscaler is asked for the
    workers' bundles, and the run goes on once the nodes joined (here, on the third look)."""
    import ray
    import ray.autoscaler.sdk

    looks, requests = [], []
    monkeypatch.setattr(ray, "cluster_resources",
                        lambda: looks.append(1) or ({"CPU": 64.0, "GPU": 8.0} if len(looks) >= 3 else {"CPU": 4.0}))
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles=None, **kw: requests.append(bundles))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    cfg = load_config("sd15", ["train.cluster_wait_s=30"])
    check_resources(cfg)
    workers = cfg.train.num_workers
    assert requests[0] == [{"CPU": cfg.train.cpus_per_worker, "GPU": 1}] * workers
    assert requests[-1] == []  # the hint is withdrawn; Ray Train's placement group holds the nodes


def test_cluster_that_never_provides_gpus_is_refused_after_the_wait(monkeypatch):
    import ray
    import ray.autoscaler.sdk

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: None)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    with pytest.raises(ConfigError, match="no autoscaler") as e:
        check_resources(load_config("sd15", ["train.cluster_wait_s=0.2"]))
    assert "GPU" in str(e.value) and "train.use_gpu=false" in str(e.value)


@pytest.mark.parametrize("preset, gpu", [("tiny", False), ("sd15", True)])
def test_launch_asks_ray_for_gpus_exactly_when_configured(monkeypatch, tmp_path, preset, gpu):
    import ray.train.torch

    from training.runtime import launcher

    class Asked(Exception):
        pass

    class FakeTrainer:
        def __init__(self, *args, scaling_config, **kwargs):
            raise Asked(scaling_config)

    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")  # an autoscaling cluster
    monkeypatch.setattr(launcher, "ensure_ray", lambda cfg, forward_env=None: None)
    monkeypatch.setattr(launcher, "check_resources", lambda cfg: None)  # tested above
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    cfg = load_config(preset)
    with pytest.raises(Asked) as asked:
        launcher.launch(cfg, str(tmp_path), storage_uri=str(tmp_path), name="t", mlflow_run_id=None,
                        tracking_uri=None, frozen={})
    scaling = asked.value.args[0]
    assert scaling.use_gpu is gpu
    assert scaling.num_workers == cfg.train.num_workers
    assert scaling.resources_per_worker == {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if gpu else {})}


def test_real_local_ray_without_gpus_refuses_sd15():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray started by another test is still up")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ConfigError, match="train.use_gpu=true asks for 8 GPU workers"):
            check_resources(load_config(ROOT / "configs/sd15.yaml"))
        with pytest.raises(ConfigError, match="asks for 3 CPUs but the local Ray has 2"):
            check_resources(load_config("tiny", ["train.num_workers=3"]))
        check_resources(load_config("tiny"))
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_cli_refuses_gpu_run_on_local_ray_without_gpus_in_one_line(capsys, tmp_path):
    import ray
    import torch

    from pipelines.cli import main

    if ray.is_initialized():
        pytest.skip("a Ray started by another test is still up")
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs the run asks for")
    main(["synth", "--out", str(tmp_path / "raw"), "--n", "4"])
    main(["shard", "--source", str(tmp_path / "raw"), "--output", str(tmp_path / "s64"), "--no-progress"])
    capsys.readouterr()
    try:
        code = main(["train", "--config", "tiny", "--set", "train.use_gpu=true", "--data", str(tmp_path / "s64")])
    finally:
        ray.shutdown()
    # stderr also carries progress bars and Ray's start-up log; the error itself is one line.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ldmflow train: error:")]
    assert code == 2 and len(errors) == 1, errors
    assert "train.use_gpu=true asks for 2 GPU workers (train.num_workers=2)" in errors[0]
    assert "train.use_gpu=false" in errors[0] and "RAY_ADDRESS" in errors[0]
