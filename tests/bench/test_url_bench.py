"""The urls benchmark group on a few hundred rows: its server, its table and its process sampling work,
so `make bench` does not find them broken after a change to the shard CLI."""

from __future__ import annotations

import urllib.request

from bench.url_fetch import ImageServer, bench_urls


def test_server_gives_each_row_its_own_bytes():
    with ImageServer() as server:
        bodies = [urllib.request.urlopen(server.url(i), timeout=10).read() for i in (0, 64, 1)]
    assert len(set(bodies)) == 3 and all(b.startswith(b"\xff\xd8\xff\xfe") for b in bodies)  # JPEG + comment
    assert server.served == 3


def test_url_group_shards_every_row_and_samples_the_tree(tmp_path):
    result = bench_urls(tmp_path, rows=300, cap_s=120)
    assert result.unavailable == "" and result.written == 300 and result.skipped == {}
    assert result.served == 300 and result.rows_per_s > 0
    roles = [p["role"] for p in result.processes_seen]
    assert roles[0] == "cli" and roles.count("worker") == result.processes
    assert all(p["fds_first"] > 0 and p["fds_last"] > 0 for p in result.processes_seen)
    assert result.peak_tree_rss_bytes >= max(p["peak_rss_bytes"] for p in result.processes_seen) > 0
