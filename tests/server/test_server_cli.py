"""`elasticserve serve`: argument parsing, and a server built from arguments really serving."""

from __future__ import annotations

import argparse
import threading
import time

import httpx
import pytest

from elasticserve.server.cli_serve import (
    add_serve_parser,
    engine_args,
    make_server,
    parse_model_specs,
    parse_origins,
    parse_size,
    run_server,
    serve_options,
    served_models,
)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="elasticserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_sizes():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512 MiB") == 512 << 20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "lots", "4 parsecs", "0", "-1GiB"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_model_specs():
    assert parse_model_specs(["a=models/x", "models/y/"]) == {"a": "models/x", "y": "models/y/"}
    with pytest.raises(ValueError, match="twice"):
        parse_model_specs(["a=x", "a=y"])
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_model_specs(["=x"])


def test_defaults_bind_loopback_with_one_shared_budget():
    args = _parse()
    assert (args.host, args.port, args.model, args.memory) == ("127.0.0.1", 8000, [], 4 << 30)
    assert (args.memory_policy, args.admin_token, args.idle_sleep_s) == ("arbiter", None, None)
    args = _parse("--model", "a=x", "--max-num-seqs", "7", "--threads", "1")
    assert engine_args(args).max_num_seqs == 7 and engine_args(args).num_threads == 1
    assert _parse("--memory-policy", "static").memory_policy == "static"
    with pytest.raises(SystemExit):
        _parse("--memory", "much")
    with pytest.raises(SystemExit):
        _parse("--memory-policy", "greedy")


def test_default_model_is_made_and_served(tmp_path, monkeypatch, capsys):
    from elasticserve.models import train

    monkeypatch.chdir(tmp_path)  # the default model lands in ./models/demo-llama
    # the demo recipe's shape with a few steps: the real one trains for up to a minute
    monkeypatch.setattr(train, "DEMO_RECIPE", train.TrainRecipe(steps=2, batch_size=2))
    port_file = tmp_path / "port"
    # port 0: the server binds a port the kernel picks and reports it; no probe-then-close race
    args = _parse("--port", "0", "--port-file", str(port_file), "--log-level", "warning",
                  "--memory", "64MiB")
    server, engines = make_server(args)
    assert train.trained_with(str(tmp_path / "models" / "demo-llama"),
                              train.recipe_key(train.DEMO_RECIPE, "llama", "demo"))
    assert "training the demo llama model for models/demo-llama" in capsys.readouterr().err
    thread = threading.Thread(target=run_server, args=(server, args), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not (server.started and port_file.exists()):
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = int(port_file.read_text())
        assert port != 0
        # the same port, in the line a caller without --port-file parses
        assert f"elasticserve: listening on http://127.0.0.1:{port}\n" in capsys.readouterr().out
        url = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["demo-llama"]
        resp = httpx.post(f"{url}/v1/completions", json={"model": "demo-llama", "prompt": "x",
                                                          "max_tokens": 2}, timeout=30)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.should_exit = True
        thread.join(10)
        for engine in engines.values():
            engine.shutdown()
    assert not thread.is_alive()


def test_serve_process_finds_the_port_the_child_bound(tmp_path):
    from elasticserve.bench.serve_process import serve_process
    from elasticserve.models.make_model import make_model

    model = make_model("llama", "tiny", str(tmp_path / "m"))
    with serve_process(["--model", f"m={model}", "--memory", "64MiB"], start_timeout_s=60) as url:
        assert not url.endswith(":0")
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["m"]


def test_shutdown_timeout_is_seconds_at_least_0():
    assert _parse().shutdown_timeout == 30.0
    assert _parse("--shutdown-timeout", "0").shutdown_timeout == 0.0
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            _parse("--shutdown-timeout", bad)


def test_vllm_serve_flags_parse():
    args = _parse("--model", "models/m", "--served-model-name", "a", "b", "--max-model-len",
                  "128", "--api-key", "k", "--chat-template", "{{ x }}",
                  "--allowed-origins", '["http://a", "http://b"]', "--allowed-origins", "http://c")
    assert served_models(args) == ({"a": "models/m"}, {"b": "a", "models/m": "a"})
    assert engine_args(args).max_model_len == 128
    assert args.allowed_origins == ["http://a", "http://b", "http://c"]
    options = serve_options(args)
    assert (options.api_key, options.chat_template) == ("k", "{{ x }}")
    assert options.allowed_origins == ("http://a", "http://b", "http://c")
    assert parse_origins("http://a, http://b") == ["http://a", "http://b"]
    # NAME=DIR is addressed by NAME only; a bare DIR by its path too
    assert served_models(_parse("--model", "x=models/m")) == ({"x": "models/m"}, {})
    assert served_models(_parse("--model", "models/m")) == ({"m": "models/m"}, {"models/m": "m"})
    with pytest.raises(ValueError, match="exactly one --model"):
        served_models(_parse("--model", "a=x", "--model", "b=y", "--served-model-name", "c"))
    with pytest.raises(SystemExit):
        _parse("--allowed-origins", '["unclosed"')


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELASTICSERVE_API_KEY", "from-env")
    assert serve_options(_parse()).api_key == "from-env"


def test_server_built_from_vllm_flags(model_dir):
    from fastapi.testclient import TestClient

    args = _parse("--model", model_dir, "--served-model-name", "a", "b", "--max-model-len",
                  "128", "--api-key", "k", "--memory", "64MiB", "--log-level", "warning")
    server, engines = make_server(args)
    try:
        client = TestClient(server.config.app)
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [
            ("a", 128), ("b", 128), (model_dir, 128)]
        resp = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                           json={"model": "b", "prompt": "x", "max_tokens": 1})
        assert resp.status_code == 200 and resp.json()["model"] == "a"
    finally:
        for engine in engines.values():
            engine.shutdown()


def test_device_flags_reach_the_engine_args():
    args = engine_args(_parse())
    assert (args.device, args.cuda_graphs) == ("cpu", False)
    args = engine_args(_parse("--device", "cuda", "--cuda-graphs"))
    assert (args.device, args.cuda_graphs) == ("cuda", True)
    with pytest.raises(SystemExit):
        _parse("--device", "tpu")


def test_pd_refuses_layerwise_residency_before_starting_workers():
    from elasticserve.server.cli_workers import start_workers

    args = _parse("--pd", "m=1:1", "--host-kv-memory", "64MiB", "--layerwise-residency")
    with pytest.raises(ValueError, match="--layerwise-residency does not work with --pd"):
        start_workers(args, [], engine_args(args))  # refused before any model or worker


def test_stream_tpot_ms_flag():
    args = engine_args(_parse("--host-kv-memory", "64MiB", "--layerwise-residency",
                              "--stream-tpot-ms", "20"))
    assert args.cache_config().stream_tpot_ms == 20.0
    assert engine_args(_parse()).stream_tpot_ms is None
    with pytest.raises(ValueError, match="stream_tpot_ms"):
        engine_args(_parse("--host-kv-memory", "64MiB", "--layerwise-residency",
                           "--stream-tpot-ms", "0")).cache_config()
