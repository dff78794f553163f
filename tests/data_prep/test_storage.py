"""data_prep.storage against real local directories and a real S3 server (SeaweedFS on 127.0.0.1).

Tests taking the `root` fixture run twice, once per backend, and assert the same behaviour.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
from botocore.response import StreamingBody

from data_prep import storage
from data_prep.errors import DataPrepError
from data_prep.storage import (
    LocalStorage,
    NoSuchObjectError,
    ObjectInfo,
    S3Storage,
    StorageError,
    basename,
    is_s3,
    join,
    local_path,
    storage_for,
)

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty prefix: a local directory, or a prefix in a fresh bucket on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- URI helpers


def test_uri_helpers():
    assert is_s3("s3://b/p") and is_s3("S3://b") and not is_s3("/data/s3") and not is_s3("file:///x")
    assert join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert join("s3://b/p/", "/x/", "y.tar") == "s3://b/p/x/y.tar"
    assert join("s3://b", "x") == "s3://b/x"
    assert join("s3://b//p", "") == "s3://b//p"  # an S3 key stays exact (see test_s3_uris_name_keys_exactly)
    assert join("/data", "x", "y.tar") == "/data/x/y.tar"
    assert join("/data/", "/x//", "y.tar") == "/data/x/y.tar"  # a leading "/" does not restart the path
    assert join("rel", "x") == os.path.join("rel", "x")
    assert join("file:///data", "x") == "file:///data/x"
    assert basename("s3://b/p/x.tar") == "x.tar" and basename("s3://b/p/") == "p"
    assert basename("/data/x.tar") == "x.tar" and basename("file:///data/dir/") == "dir"


def test_s3_uris_name_keys_exactly(s3_bucket):
    """S3 keys are names: "raw//a.png", "/lead.png" and "raw/a.png" are three objects on AWS S3, and a
    listing returns each as it is, so each URI must reach S3 as exactly its key (the URI layer collapsed
    slashes, and such an object listed in a source became an unreadable skip)."""
    exact = ["raw//a.png", "raw/b//c.png", "/lead.png", "raw/x.png"]
    for key in exact:
        assert storage._split_s3(f"s3://b/{key}") == ("b", key)
    assert join("s3://b/a//b", "c") == "s3://b/a//b/c" and join("s3://b/raw//", "/x.png") == "s3://b/raw/x.png"
    assert storage.collapse_slashes("s3://b//a//b/") == "s3://b/a/b/"  # for pyarrow (Ray's storage) only

    # What a real server is asked for: the key of every request the storage layer makes.
    store = storage_for(f"s3://{s3_bucket}")
    sent: list[str] = []

    def record(params: dict, **_: object) -> None:
        sent.append(params.get("Key", ""))

    events = store.client().meta.events
    events.register("before-parameter-build.s3", record)
    try:
        for key in exact:
            uri = f"s3://{s3_bucket}/{key}"
            store.put_bytes(uri, b"data")
            assert store.exists(uri) and store.size(uri) == 4 and store.read_bytes(uri) == b"data"
            store.delete(uri)
    finally:
        events.unregister("before-parameter-build.s3", record)
    assert sent == [key for key in exact for _ in range(5)]


def test_local_path_and_scheme_checks():
    assert local_path("/data/x") == "/data/x"
    assert local_path("file:///data/my%20x") == "/data/my x"
    assert local_path(Path("/data")) == "/data"
    with pytest.raises(StorageError, match="is an S3 URI, but only a local path works here"):
        local_path("s3://bucket/key")
    with pytest.raises(StorageError, match="slash lost"):
        storage_for(Path("s3://bucket/key"))  # pathlib collapsed it to "s3:/bucket/key"
    with pytest.raises(StorageError, match="unsupported storage URI"):
        storage_for("gs://bucket/key")
    with pytest.raises(StorageError, match="names no bucket"):
        storage_for("s3:///key")
    assert isinstance(storage_for("s3://b/p"), S3Storage)
    assert isinstance(storage_for("/tmp/x"), LocalStorage) and isinstance(storage_for("file:///tmp"), LocalStorage)
    assert issubclass(StorageError, DataPrepError)
    with pytest.raises(StorageError, match="multipart_threshold"):
        S3Storage(multipart_threshold=1024)


# --------------------------------------------------------------------------------- both backends


def test_put_list_exists_size_read(root: str):
    st = storage_for(root)
    st.put_bytes(join(root, "b.txt"), b"bee")
    st.put_bytes(join(root, "a.txt"), b"a")
    st.put_bytes(join(root, "sub", "deep", "c.bin"), b"c" * 1000)
    st.put_bytes(join(root + "2", "sibling.txt"), b"not under root")  # "data2" must not list under "data"

    assert st.list(root) == [
        ObjectInfo(uri=join(root, "a.txt"), name="a.txt", size=1),
        ObjectInfo(uri=join(root, "b.txt"), name="b.txt", size=3),
        ObjectInfo(uri=join(root, "sub/deep/c.bin"), name="sub/deep/c.bin", size=1000),
    ]
    assert st.list(root + "/") == st.list(root)
    assert [o.name for o in st.list(root, recursive=False)] == ["a.txt", "b.txt"]
    assert [o.name for o in st.list(join(root, "sub"))] == ["deep/c.bin"]
    assert st.list(join(root, "nothing-here")) == []

    assert st.exists(join(root, "a.txt")) and not st.exists(join(root, "missing.txt"))
    assert st.size(join(root, "sub/deep/c.bin")) == 1000
    assert st.read_bytes(join(root, "b.txt")) == b"bee"

    st.put_bytes(join(root, "b.txt"), b"replaced")
    assert st.read_bytes(join(root, "b.txt")) == b"replaced"

    for op in (st.read_bytes, st.size, st.open_read):
        with pytest.raises(NoSuchObjectError) as info:
            op(join(root, "missing.txt"))
        assert isinstance(info.value, StorageError) and isinstance(info.value, FileNotFoundError)
        assert "missing.txt" in str(info.value)


def test_open_read_streams(root: str, tmp_path: Path):
    st = storage_for(root)
    data = os.urandom(3 * MiB + 17)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    st.put_file(str(src), join(root, "payload.bin"))

    with st.open_read(join(root, "payload.bin")) as f:
        if is_s3(root):  # reads come from the GetObject body stream, not from bytes fetched up front
            assert isinstance(f.raw._body, StreamingBody)
        chunks = []
        while chunk := f.read(256 * 1024):
            assert len(chunk) <= 256 * 1024
            chunks.append(chunk)
    assert f.closed
    assert b"".join(chunks) == data


def test_delete_and_delete_prefix(root: str):
    st = storage_for(root)
    for name in ("keep.txt", "gone/1.txt", "gone/2.txt", "gone/nested/3.txt"):
        st.put_bytes(join(root, name), name.encode())

    st.delete(join(root, "keep.txt"))
    st.delete(join(root, "keep.txt"))  # missing is fine
    assert not st.exists(join(root, "keep.txt"))

    assert st.delete_prefix(join(root, "gone")) == 3
    assert st.list(root) == []
    assert st.delete_prefix(join(root, "gone")) == 0
    bucket_or_fs_root = "s3://" + root[5:].split("/")[0] if is_s3(root) else "/"
    with pytest.raises(StorageError, match="refusing to delete every"):
        st.delete_prefix(bucket_or_fs_root)


def test_put_file_missing_source(root: str, tmp_path: Path):
    with pytest.raises(StorageError, match="is not an existing local file"):
        storage_for(root).put_file(str(tmp_path / "nope.tar"), join(root, "x.tar"))


def test_check_readable_missing(root: str):
    st = storage_for(root)
    with pytest.raises(StorageError, match="does not exist|nothing at"):
        st.check_readable(join(root, "missing"))
    st.put_bytes(join(root, "dir", "x.bin"), b"x")
    st.check_readable(join(root, "dir"))  # a prefix with objects under it
    st.check_readable(join(root, "dir", "x.bin"))  # an object


def test_check_writable_creates_nothing_visible(root: str):
    st = storage_for(root)
    st.check_writable(join(root, "out"))
    assert st.list(root) == []  # the probe is gone


# ------------------------------------------------------------------------------------ local only


def test_check_writable_local_path_is_a_file(tmp_path: Path):
    target = tmp_path / "out"
    target.write_text("I am a file")
    with pytest.raises(StorageError, match="is an existing file, not a directory"):
        LocalStorage().check_writable(str(target))
    with pytest.raises(StorageError, match="cannot write to local directory"):
        LocalStorage().check_writable(str(target / "sub"))  # a parent is a file


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_writable_local_unwritable_dir(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="cannot write to local directory .*Permission denied"):
            LocalStorage().check_writable(str(locked / "out"))
    finally:
        locked.chmod(0o700)


def test_check_readable_local_missing_names_the_path(tmp_path: Path):
    with pytest.raises(StorageError, match=f"local path {tmp_path}/nope does not exist"):
        LocalStorage().check_readable(str(tmp_path / "nope"))


def test_local_put_file_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * MiB))
    out = tmp_path / "out"
    LocalStorage().put_bytes(str(out / "old.bin"), b"old")

    def copy_half_then_fail(fsrc, fdst, length=0):
        fdst.write(fsrc.read(MiB))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(StorageError, match="No space left on device"):
        LocalStorage().put_file(str(src), str(out / "new.bin"))
    assert sorted(os.listdir(out)) == ["old.bin"]  # no target, no temp file


def test_local_list_skips_in_progress_temp_files(tmp_path: Path):
    (tmp_path / ".x.tar.tmp-0123456789abcdef").write_bytes(b"partial")
    (tmp_path / ".hidden").write_bytes(b"kept")
    assert [o.name for o in LocalStorage().list(str(tmp_path))] == [".hidden"]


# --------------------------------------------------------------------------------------- S3 only


def test_s3_multipart_put_file_round_trip(s3_bucket: str, s3_env, tmp_path: Path):
    data = os.urandom(12 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    st = S3Storage(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    uri = f"s3://{s3_bucket}/shards/big.bin"
    st.put_file(str(src), uri)

    head = s3_env.client().head_object(Bucket=s3_bucket, Key="shards/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: it really was a multipart upload
    assert st.size(uri) == len(data)
    digest = hashlib.sha256()
    with st.open_read(uri) as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_s3_interrupted_multipart_upload_shows_no_object(s3_bucket: str, s3_env, tmp_path: Path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    st = S3Storage(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    uri = f"s3://{s3_bucket}/shards/big.bin"
    calls = []

    def fail_second_part(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise ConnectionResetError("simulated network failure during part 2")

    events = st.client().meta.events
    events.register("before-call.s3.UploadPart", fail_second_part)
    try:
        with pytest.raises(StorageError, match="simulated network failure"):
            st.put_file(str(src), uri)
    finally:
        events.unregister("before-call.s3.UploadPart", fail_second_part)
    assert len(calls) >= 2  # the failure hit mid-upload, after a part had gone through
    assert not st.exists(uri)
    assert st.list(f"s3://{s3_bucket}") == []
    # s3transfer aborted the multipart upload: no orphaned parts are left billing storage.
    assert s3_env.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_s3_missing_bucket(s3_env):
    st = storage_for("s3://no-such-bucket-ldmflow/x")
    expected = f"bucket no-such-bucket-ldmflow does not exist at {s3_env.endpoint}; create it or fix the URI"
    for check in (st.check_readable, st.check_writable, st.read_bytes, st.list):
        with pytest.raises(StorageError, match=expected):
            check("s3://no-such-bucket-ldmflow/x")
    with pytest.raises(StorageError, match=expected):
        st.put_bytes("s3://no-such-bucket-ldmflow/x", b"x")  # SeaweedFS started with autoCreateBucket=false


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_s3_bad_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch, wrong: str):
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    storage.reset_clients()
    st = storage_for(f"s3://{s3_bucket}/out")
    code = "SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId"
    for check in (st.check_readable, st.check_writable):
        with pytest.raises(StorageError, match=rf"S3 refused the credentials \({code}\).*AWS_ACCESS_KEY_ID"):
            check(f"s3://{s3_bucket}/out")


def test_s3_access_denied(s3_bucket: str, s3_env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.reader_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.reader_secret_key)
    storage.reset_clients()
    st = storage_for(f"s3://{s3_bucket}/out")
    st.check_readable(f"s3://{s3_bucket}")  # the reader may read ...
    with pytest.raises(StorageError, match="S3 denied access .*lack permission on bucket"):
        st.check_writable(f"s3://{s3_bucket}/out")  # ... but not write


def test_s3_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    st = S3Storage(endpoint_url=endpoint, max_attempts=1, connect_timeout=2)
    with pytest.raises(StorageError, match=f"S3 endpoint {endpoint} is unreachable.*AWS_ENDPOINT_URL"):
        st.check_readable("s3://bucket/x")


def test_s3_no_credentials(monkeypatch: pytest.MonkeyPatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    st = S3Storage(endpoint_url=f"http://127.0.0.1:{_free_port()}", max_attempts=1)
    storage.reset_clients()
    try:
        with pytest.raises(StorageError, match="no AWS credentials found"):
            st.check_writable("s3://bucket/x")
    finally:
        storage.reset_clients()


def test_s3_object_key_required(s3_bucket: str):
    with pytest.raises(StorageError, match="names no object key"):
        storage_for(f"s3://{s3_bucket}/").put_bytes(f"s3://{s3_bucket}/dir/", b"x")


def test_s3_list_skips_directory_markers(s3_bucket: str, s3_env):
    client = s3_env.client()
    client.put_object(Bucket=s3_bucket, Key="p/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="p/emptydir/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="p/x.txt", Body=b"x")
    assert [o.name for o in storage_for(f"s3://{s3_bucket}/p").list(f"s3://{s3_bucket}/p")] == ["x.txt"]
    assert storage_for(f"s3://{s3_bucket}").delete_prefix(f"s3://{s3_bucket}/p") == 3


def test_s3_delete_prefix_batches_past_1000(s3_bucket: str, s3_env):
    client = s3_env.client()
    for i in range(1005):
        client.put_object(Bucket=s3_bucket, Key=f"many/{i:05d}", Body=b"")
    st = storage_for(f"s3://{s3_bucket}")
    assert len(st.list(f"s3://{s3_bucket}/many")) == 1005  # paginated listing
    assert st.delete_prefix(f"s3://{s3_bucket}/many") == 1005
    assert st.list(f"s3://{s3_bucket}/many") == []


def test_s3_clients_cached_per_process(s3_bucket: str):
    uri = f"s3://{s3_bucket}/x.bin"
    st = storage_for(uri)
    st.put_bytes(uri, b"from parent")
    parent_client = st.client()
    assert storage_for(uri).client() is parent_client  # cached

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        child_st = storage_for(uri)
        queue.put((child_st.client() is parent_client, child_st.read_bytes(uri)))

    proc = ctx.Process(target=child)
    proc.start()
    same_client, data = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert not same_client and data == b"from parent"  # the forked child built its own client

    storage.reset_clients()
    assert storage_for(uri).client() is not parent_client



def test_an_s3_read_that_breaks_off_mid_stream_resumes_at_its_byte(s3_bucket, monkeypatch):
    """botocore retries requests, not a body being read: a connection reset while a shard streamed
    used to crash the reader (and the training worker with it)."""
    import urllib3
    from botocore.response import StreamingBody

    from data_prep import storage

    store = storage.storage_for(f"s3://{s3_bucket}/x")
    data = os.urandom(8 * 2**20)
    store.put_bytes(f"s3://{s3_bucket}/blob", data)
    real_read, state = StreamingBody.read, {"read": 0, "resets": 0, "gets": 0}
    real_get = store.client().get_object

    def flaky_read(self, amt=None):
        if state["read"] > 2 * 2**20 and state["resets"] < 2:  # twice, past 2 MiB: the socket is reset
            state["resets"] += 1
            state["read"] = 0
            raise urllib3.exceptions.ProtocolError("Connection broken: ConnectionResetError(104)")
        chunk = real_read(self, amt)
        state["read"] += len(chunk)
        return chunk

    def counting_get(**kwargs):
        state["gets"] += 1
        return real_get(**kwargs)

    monkeypatch.setattr(StreamingBody, "read", flaky_read)
    monkeypatch.setattr(store.client(), "get_object", counting_get)
    monkeypatch.setattr(storage._BodyReader, "__init__",
                        functools.partialmethod(storage._BodyReader.__init__, backoff=0.01))
    with store.open_read(f"s3://{s3_bucket}/blob", start=1000) as f:
        got = b"".join(iter(lambda: f.read(256 * 1024), b""))  # as the shard reader reads
    assert got == data[1000:]
    assert state["resets"] == 2 and state["gets"] == 3  # the first GET and a ranged one per reset
