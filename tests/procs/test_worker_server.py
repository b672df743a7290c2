"""`serve --replicas` end to end over HTTP: completions from worker processes, /admin/workers."""

from __future__ import annotations

import os

import pytest

from elasticserve.cli import build_parser
from elasticserve.models.make_model import make_model
from elasticserve.server.cli_serve import make_server
from elasticserve.server.cli_workers import parse_replicas

pytest.importorskip("fastapi")


def test_replicas_flag_parses_and_refuses_bad_counts() -> None:
    assert parse_replicas(["a=2", "b=1"]) == {"a": 2, "b": 1}
    for bad in ("a", "a=0", "a=-1", "a=x"):
        with pytest.raises(ValueError, match="--replicas"):
            parse_replicas([bad])


def test_two_replicas_serve_and_show_in_admin_workers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    model = make_model("llama", "tiny", str(tmp_path / "m"))
    args = build_parser().parse_args(["serve", "--model", f"m={model}", "--replicas", "m=2",
                                      "--memory", "128MiB", "--admin-token", "t",
                                      "--log-level", "warning"])
    server, engines = make_server(args)
    try:
        client = TestClient(server.config.app)
        for i in range(4):
            resp = client.post("/v1/completions", json={"model": "m", "prompt": f"x {i}",
                                                        "max_tokens": 3})
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 3
        assert client.get("/admin/workers").status_code == 401
        workers = client.get("/admin/workers",
                             headers={"Authorization": "Bearer t"}).json()["workers"]
        assert [w["worker"] for w in workers] == ["m#0", "m#1"]
        assert {w["state"] for w in workers} == {"ready"}
        assert {w["role"] for w in workers} == {"colocated"}
        pids = {w["pid"] for w in workers}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(w["kv_pages"] >= 1 and w["restarts"] == 0 for w in workers)
        report = client.get("/admin/memory", headers={"Authorization": "Bearer t"}).json()
        assert report["models"]["m"]["replicas"] == 2
    finally:
        server.close()


def test_in_process_pool_reports_itself_as_one_worker_per_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    model = make_model("llama", "tiny", str(tmp_path / "m"))
    args = build_parser().parse_args(["serve", "--model", f"m={model}", "--in-process",
                                      "--memory", "64MiB", "--admin-token", "t"])
    server, _ = make_server(args)
    try:
        workers = TestClient(server.config.app).get(
            "/admin/workers", headers={"Authorization": "Bearer t"}).json()["workers"]
        assert [(w["worker"], w["pid"], w["state"]) for w in workers] == [
            ("m", os.getpid(), "awake")]
        assert workers[0]["weights_bytes"] > 0
    finally:
        server.close()
