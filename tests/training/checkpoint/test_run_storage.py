"""Where Ray Train runs live (training.checkpoint.run_storage), local and on a real S3 server (SeaweedFS).

Checkpoints here are real in layout (training.checkpointing writes their lists and markers, each
rank in its own folder, merged like Ray's upload) with DeepSpeed's files faked by bytes; the S3
copies are uploaded object by object, as Ray's upload leaves them. The slow test runs real Ray
workers against S3 and records what Ray 2.60 does with async uploads and a reused run name.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from data_prep import storage
from data_prep.storage import StorageError
from training.checkpoint.layout import COMMITTED, EMA_FILE, FILES_DIR, STATE_FILE, CheckpointError, TrainState
from training.checkpoint.run_storage import as_checkpoint, check_run_storage, download_checkpoint, ray_storage, run_uri
from training.checkpoint.verify import latest_verified_checkpoint, list_checkpoints, read_state, verify_checkpoint
from training.checkpoint.writer import mark_committed, rng_state, save_rank_files, write_file_list

WORLD = 2


# --- building checkpoints -----------------------------------------------------------------------


def build_checkpoint(work: Path, run: Path, name: str, step: int, *, commit: bool = True) -> Path:
    """A checkpoint of `WORLD` ranks at `step` in `run`/`name`, made the way the workers make one."""
    tag = f"step-{step:08d}"
    digests = []
    locals_ = [work / f"{name}-r{rank}" for rank in range(WORLD)]
    for rank, local in enumerate(locals_):
        shard = local / "deepspeed" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True)
        shard.write_bytes(bytes(range(256)) * (rank + 3 + step))
        if rank == 0:
            (local / "deepspeed" / tag / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
            (local / EMA_FILE).write_bytes(b"ema" * 200)
        save_rank_files(local, rank, loader={"epoch": 0, "consumed": step * (rank + 1)},
                        rng=rng_state(torch.Generator().manual_seed(rank)))
        digests.append(write_file_list(local, rank))
    if commit:
        mark_committed(locals_[0], TrainState(step=step, samples_seen=8 * step, world_size=WORLD, tag=tag), digests)
    target = run / name
    for local in locals_:  # Ray copies each rank's folder into the same storage folder
        shutil.copytree(local, target, dirs_exist_ok=True)
    return target


def name(step: int) -> str:
    """Ray's checkpoint folder name, with the step as the seconds so names sort like steps."""
    return f"checkpoint_2026-01-01_00-00-{step:02d}.000000"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 4 and 8 and broken ones after them, plus Ray's files."""
    work = tmp_path_factory.mktemp("ranks")
    run = tmp_path_factory.mktemp("storage") / "train-abc"
    build_checkpoint(work, run, name(4), 4)
    build_checkpoint(work, run, name(8), 8)
    partial = build_checkpoint(work, run, name(12), 12)  # rank 1's shard never arrived
    (partial / "deepspeed" / "step-00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    build_checkpoint(work, run, name(16), 16, commit=False)  # killed before rank 0 committed
    truncated = build_checkpoint(work, run, name(20), 20)
    shard = truncated / "deepspeed" / "step-00000020" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-1])
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / ".validate_storage_marker").write_text("")
    return run


def upload_tree(s3_server, local: Path, bucket: str, prefix: str) -> str:
    client = s3_server.client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture
def s3_run(s3_server, s3_bucket, local_run) -> str:
    return upload_tree(s3_server, local_run, s3_bucket, "runs/train-abc")


# --- ray_storage and the preflight check ----------------------------------------------------


def test_local_storage_is_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_storage("runs") == (str(tmp_path / "runs"), None)
    assert ray_storage(f"file://{tmp_path}/runs") == (str(tmp_path / "runs"), None)
    assert run_uri("runs", "train-1") == str(tmp_path / "runs" / "train-1")
    check_run_storage("runs")
    assert (tmp_path / "runs").is_dir()


def test_s3_storage_is_a_scheme_free_path_on_a_working_filesystem(s3_env, s3_bucket):
    import pyarrow.fs

    path, fs = ray_storage(f"s3://{s3_bucket}//runs/")
    assert path == f"{s3_bucket}/runs"
    assert isinstance(fs, pyarrow.fs.S3FileSystem)
    assert run_uri(f"s3://{s3_bucket}/runs/", "train-1") == f"s3://{s3_bucket}/runs/train-1"
    with fs.open_output_stream(f"{path}/train-1/hello.txt") as out:
        out.write(b"hello")
    with fs.open_input_stream(f"{path}/train-1/hello.txt") as f:
        assert f.read() == b"hello"
    assert storage.storage_for(f"s3://{s3_bucket}").read_bytes(f"s3://{s3_bucket}/runs/train-1/hello.txt") == b"hello"
    pickled = fs.__reduce__()[1][0]  # what Ray ships to every worker with the RunConfig
    assert (pickled["access_key"], pickled["secret_key"], pickled["session_token"]) == (None, None, None)
    assert pickled["endpoint_override"] == s3_env.endpoint.split("://")[1]
    check_run_storage(f"s3://{s3_bucket}/runs")
    assert storage.storage_for(f"s3://{s3_bucket}").list(f"s3://{s3_bucket}/runs") == [
        storage.ObjectInfo(uri=f"s3://{s3_bucket}/runs/train-1/hello.txt", name="train-1/hello.txt", size=5)]


def test_unwritable_local_storage_is_one_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file where the runs should go")
    with pytest.raises(StorageError, match="is an existing file"):
        check_run_storage(str(tmp_path / "taken"))


def assert_fails_fast(uri: str, match: str) -> None:
    start = time.monotonic()
    with pytest.raises(StorageError, match=match):
        check_run_storage(uri)
    assert time.monotonic() - start < 10


def test_wrong_secret_fails_fast(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_clients()
    assert_fails_fast(f"s3://{s3_bucket}/runs", "refused the credentials.*SignatureDoesNotMatch")


def test_read_only_credentials_fail_fast(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.reader_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.reader_secret_key)
    storage.reset_clients()
    assert_fails_fast(f"s3://{s3_bucket}/runs", "denied access")


def test_unknown_bucket_fails_fast(s3_env):
    assert_fails_fast("s3://no-such-bucket-here/runs", "bucket no-such-bucket-here does not exist")


def test_unreachable_endpoint_fails_fast(s3_env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage.reset_clients()
    assert_fails_fast("s3://bucket/runs", "unreachable")


def test_hung_endpoint_fails_in_bounded_time(s3_env, monkeypatch):
    """An endpoint that accepts connections and never answers: the preflight's short timeouts end it
    in seconds (about 9 here: two attempts), where the SDK defaults would retry for minutes."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hung.getsockname()[1]}")
        storage.reset_clients()
        start = time.monotonic()
        with pytest.raises(StorageError, match="Read timeout"):
            check_run_storage("s3://bucket/runs")
        assert time.monotonic() - start < 20


def test_pyarrow_refusals_name_the_cause(s3_env, s3_bucket, monkeypatch):
    """Ray uploads through pyarrow, which resolves credentials apart from boto3; when only pyarrow
    is refused, check_run_storage says so (real errors from the server, mapped)."""
    from training.checkpoint.run_storage import _TRAIN_TIMEOUTS, _pyarrow_error, _s3_filesystem

    def refusal(bucket: str) -> str:
        with pytest.raises(OSError) as caught:
            with _s3_filesystem(bucket, **_TRAIN_TIMEOUTS).open_output_stream(f"{bucket}/runs/x") as out:
                out.write(b"x")
        return str(_pyarrow_error(caught.value, f"s3://{bucket}/runs", s3_env.endpoint))

    assert "the bucket does not exist" in refusal("no-such-bucket-here")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert "S3 refused it (SIGNATURE_DOES_NOT_MATCH) although boto3 could write there" in refusal(s3_bucket)


def test_malformed_endpoint_is_refused(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:8333")
    with pytest.raises(StorageError, match="must be scheme://host"):
        ray_storage("s3://bucket/runs")


# --- finding and verifying checkpoints --------------------------------------------------------


def test_list_checkpoints_reads_markers(local_run, s3_run):
    for run in (str(local_run), s3_run):
        refs = list_checkpoints(run)
        assert [r.name for r in refs] == [name(s) for s in (4, 8, 12, 16, 20)]
        assert [(r.step, r.tag, r.world_size) for r in refs] == [
            (4, "step-00000004", WORLD), (8, "step-00000008", WORLD), (12, "step-00000012", WORLD),
            (None, None, None), (20, "step-00000020", WORLD)]
        assert [r.committed for r in refs] == [True, True, True, False, True]
        assert refs[0].uri == storage.join(run, name(4))
        assert refs[0].files[f"{FILES_DIR}/rank-1.json"] > 0


def test_missing_run_has_no_checkpoints(tmp_path, s3_bucket):
    assert list_checkpoints(str(tmp_path / "nothing")) == []
    assert list_checkpoints(f"s3://{s3_bucket}/nothing") == []
    assert latest_verified_checkpoint(f"s3://{s3_bucket}/nothing") is None


def test_latest_verified_skips_partial_uncommitted_and_truncated(local_run, s3_run):
    for run in (str(local_run), s3_run):
        latest = latest_verified_checkpoint(run)
        assert latest is not None and (latest.step, latest.name) == (8, name(8))
        assert latest_verified_checkpoint(run, verify_hashes=True).step == 8


def test_verification_agrees_with_read_state(local_run, s3_run):
    """The listing-based check accepts and refuses exactly what read_state does on a local folder."""
    for local, remote in zip(list_checkpoints(str(local_run)), list_checkpoints(s3_run)):
        try:
            expected = read_state(local.uri, verify_hashes=True)
        except CheckpointError as e:
            reason = re.sub(r"checkpoint \S+ |\S+/", "", str(e))
            for ref in (local, remote):
                with pytest.raises(CheckpointError) as caught:
                    verify_checkpoint(ref, verify_hashes=True)
                assert re.sub(r"checkpoint \S+ |\S+/", "", str(caught.value)) == reason
        else:
            assert verify_checkpoint(local, verify_hashes=True) == expected
            assert verify_checkpoint(remote, verify_hashes=True) == expected


def test_same_size_corruption_needs_verify_hashes(s3_server, s3_run):
    bucket, key = s3_run[5:].split("/", 1)
    shard = f"{key}/{name(8)}/deepspeed/step-00000008/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    body = s3_server.client().get_object(Bucket=bucket, Key=shard)["Body"].read()
    s3_server.client().put_object(Bucket=bucket, Key=shard, Body=bytes(b ^ 1 for b in body))
    assert latest_verified_checkpoint(s3_run).step == 8  # sizes only: the flip is invisible
    assert latest_verified_checkpoint(s3_run, verify_hashes=True).step == 4


def test_tampered_file_list_is_refused(local_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(local_run / name(8), run / name(8))
    listed = run / name(8) / FILES_DIR / "rank-1.json"
    listed.write_text(listed.read_text().replace('"size"', '"size" ', 1))
    with pytest.raises(CheckpointError, match="does not match the sha256 in COMMITTED"):
        verify_checkpoint(list_checkpoints(str(run))[0])
    assert latest_verified_checkpoint(str(run)) is None


# --- using a checkpoint -------------------------------------------------------------------------


def exported(rel: str) -> bool:
    """What the export reads: markers, lists and the EMA weights, never DeepSpeed's shards."""
    return rel in (COMMITTED, STATE_FILE, EMA_FILE) or rel.startswith(FILES_DIR + "/")


def test_download_only_the_exported_files(s3_run, tmp_path):
    ref = latest_verified_checkpoint(s3_run)
    local = download_checkpoint(ref.uri, tmp_path / "export", only=exported)
    got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert got == [COMMITTED, EMA_FILE, f"{FILES_DIR}/rank-0.json", f"{FILES_DIR}/rank-1.json", STATE_FILE]
    assert read_state(local, verify_hashes=True, only=exported).step == 8
    with pytest.raises(CheckpointError, match="missing deepspeed/"):
        read_state(local)  # the shards were left behind on purpose


def test_verify_only_selected_files(local_run):
    partial = list_checkpoints(str(local_run))[2]  # step 12: rank 1's shard is missing
    with pytest.raises(CheckpointError, match="missing deepspeed/step-00000012/zero_pp_rank_1"):
        verify_checkpoint(partial)
    assert verify_checkpoint(partial, only=exported).step == 12


def test_download_everything_listed_verifies(s3_server, s3_run, tmp_path):
    ref = latest_verified_checkpoint(s3_run)
    bucket, key = ref.uri[5:].split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=f"{key}/notes/unlisted.txt", Body=b"not the checkpoint's")
    local = download_checkpoint(ref.uri, tmp_path / "copy", only=lambda rel: not rel.startswith("notes/"))
    assert not (local / "notes").exists()
    assert read_state(local, verify_hashes=True).step == 8
    assert not list(local.rglob(".*download-*"))  # no temporary names left behind


def test_local_checkpoint_is_used_in_place(local_run, tmp_path):
    source = local_run / name(8)
    assert download_checkpoint(str(source), tmp_path / "unused", only=exported) == source
    assert not (tmp_path / "unused").exists()
    with pytest.raises(StorageError, match="no checkpoint"):
        download_checkpoint(f"{local_run}/checkpoint_missing", tmp_path / "x")


def test_missing_s3_checkpoint_is_an_error(s3_bucket, tmp_path):
    with pytest.raises(StorageError, match="nothing is stored under it"):
        download_checkpoint(f"s3://{s3_bucket}/runs/checkpoint_none", tmp_path / "x")


def test_as_checkpoint_reads_through_ray(s3_run, local_run, tmp_path):
    ref = latest_verified_checkpoint(s3_run)
    checkpoint = as_checkpoint(ref)
    assert checkpoint.path == ref.uri[len("s3://"):]
    copy = Path(checkpoint.to_directory(str(tmp_path / "via-ray")))
    assert read_state(copy, verify_hashes=True).step == 8
    assert as_checkpoint(str(local_run / name(8))).path == str(local_run / name(8))


# --- real Ray workers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_async_checkpoints_to_s3_and_a_reused_name_restores(s3_bucket, tmp_path):
    """Two Ray Train workers report committed checkpoints with async upload into S3 storage; then:
    Ray deletes each worker's local folder after the upload, the folders are checkpoint_<timestamp>
    next to checkpoint_manager_snapshot.json, and a second trainer with the same name and storage
    (after the first finished) starts from the first one's latest checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        import json as json_
        import os
        import tempfile
        from pathlib import Path as Path_

        import ray.train as rt
        import torch.distributed as dist

        from training.checkpoint.layout import TrainState as State
        from training.checkpoint.writer import mark_committed as commit
        from training.checkpoint.writer import write_file_list as list_files

        ctx = rt.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        restored = rt.get_checkpoint()
        start = 0
        if restored is not None:
            # Each rank into its own folder: as_directory() has both ranks of this node download into one
            # shared temp folder under a file lock, and the rank that waited can find it already deleted
            # by the other ("Checkpoint directory ... does not exist", seen once in a full suite run).
            d = restored.to_directory(tempfile.mkdtemp(prefix=f"restored-r{rank}-", dir=config["scratch"]))
            start = json_.loads((Path_(d) / "COMMITTED").read_text())["step"]
            import shutil as shutil_

            shutil_.rmtree(d)
        for step in range(start + 1, start + 3):
            local = Path_(tempfile.mkdtemp(prefix=f"ckpt-{step}-r{rank}-", dir=config["scratch"]))
            tag = f"step-{step:08d}"
            (local / "deepspeed" / tag).mkdir(parents=True)
            (local / "deepspeed" / tag / f"shard-{rank}.pt").write_bytes(os.urandom(1000 + rank))
            for sub, ext in (("loader", "json"), ("rng", "pt")):
                (local / sub).mkdir()
                (local / sub / f"rank-{rank}.{ext}").write_text("{}")
            digests = [None] * world
            dist.all_gather_object(digests, list_files(local, rank))
            if rank == 0:
                commit(local, State(step=step, world_size=world, tag=tag), digests)
            rt.report({"step": step, "restored": start}, checkpoint=rt.Checkpoint.from_directory(str(local)),
                      checkpoint_upload_mode=rt.CheckpointUploadMode.ASYNC)

    storage_uri = f"s3://{s3_bucket}/ray"
    check_run_storage(storage_uri)
    path, filesystem = ray_storage(storage_uri)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def fit():
        trainer = TorchTrainer(
            loop, train_loop_config={"scratch": str(scratch)},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="run-x", storage_path=path, storage_filesystem=filesystem,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3)))
        result = trainer.fit()
        assert result.error is None
        return result

    ray.init(num_cpus=3, include_dashboard=False)
    try:
        first = fit()
        assert first.metrics == {"step": 2, "restored": 0}
        assert list(scratch.iterdir()) == []  # Ray deleted every rank's folder after uploading it
        run = run_uri(storage_uri, "run-x")
        refs = list_checkpoints(run)
        assert [r.step for r in refs] == [1, 2]
        assert all(re.fullmatch(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{6}", r.name) for r in refs)
        assert latest_verified_checkpoint(run, verify_hashes=True).step == 2
        assert first.checkpoint.path == refs[-1].uri[len("s3://"):]
        names = {o.name for o in storage.storage_for(run).list(run, recursive=False)}
        assert names == {"checkpoint_manager_snapshot.json", ".validate_storage_marker"}

        second = fit()  # same name, same storage, the first run finished
        assert second.metrics == {"step": 4, "restored": 2}
        assert [r.step for r in list_checkpoints(run)] == [2, 3, 4]  # num_to_keep spans both trainers
        snapshot = json.loads(storage.storage_for(run).read_bytes(f"{run}/checkpoint_manager_snapshot.json"))
        assert snapshot["current_report_index"] == 4
    finally:
        ray.shutdown()
