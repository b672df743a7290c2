"""The Dockerfile and deploy/compose.yaml, checked without Docker (no daemon in CI): the pins match
the project's, and every command line they run parses with today's CLI, so a renamed option or
environment variable breaks here rather than in a container."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from elasticserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(ARG defaults, [(INSTRUCTION, rest)]) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    steps = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    args = dict(rest.split("=", 1) for op, rest in steps if op == "ARG" and "=" in rest)
    return args, steps


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_dockerfile_pins_the_projects_python_and_cpu_torch() -> None:
    args, steps = dockerfile()
    assert [expand(rest, args) for op, rest in steps if op == "FROM"] == ["python:3.11-slim"]
    make_pin = re.search(r"^TORCH := (torch==\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert make_pin is not None
    runs = [expand(rest, args) for op, rest in steps if op == "RUN"]
    torch = [r for r in runs if "pip install" in r and "torch==" in r]
    assert len(torch) == 1 and make_pin.group(1) in torch[0].split()
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch[0]
    project = [r for r in runs if re.search(r'pip install .*"?\.\[server\]"?', r)]
    assert len(project) == 1 and runs.index(project[0]) > runs.index(torch[0])  # torch first


def test_dockerfile_entrypoint_is_serve_on_every_interface() -> None:
    _, steps = dockerfile()
    entry = [json.loads(rest) for op, rest in steps if op == "ENTRYPOINT"]
    assert entry == [["elasticserve", "serve", "--host", "0.0.0.0"]]
    args = parse(entry[0][1:])
    assert (args.command, args.host) == ("serve", "0.0.0.0")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_compose_serves_two_models_made_by_the_one_shot_service(
        compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    server, models = services["server"], services["models"]
    assert server["depends_on"]["models"]["condition"] == "service_completed_successfully"
    # the admin token comes from the environment: the variable serve reads by default
    env = server["environment"]["ELASTICSERVE_ADMIN_TOKEN"]
    assert env.startswith("${ELASTICSERVE_ADMIN_TOKEN")
    monkeypatch.setenv("ELASTICSERVE_ADMIN_TOKEN", "from-env")
    args = parse(["serve", "--host", "0.0.0.0", *server["command"]])
    assert args.admin_token == "from-env" and args.host == "0.0.0.0"
    served = dict(spec.split("=", 1) for spec in args.model)
    assert sorted(served) == ["a", "b"]
    made = set()
    for line in models["command"][0].splitlines():
        argv = shlex.split(line.split("||", 1)[-1])
        if argv[:2] == ["elasticserve", "make-model"]:
            made.add(parse(argv[1:]).out)
    assert made == set(served.values())
    assert server["ports"] == ["${ELASTICSERVE_PORT:-8000}:" + str(args.port)]


def test_compose_builds_this_repo_and_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("server", "models"):
        build = compose["services"][name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
        assert build["args"]["DEVICE"].endswith(":-cpu}")
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["monitoring"]
        for volume in compose["services"][name]["volumes"]:
            assert (DEPLOY / volume.split(":", 1)[0]).exists(), volume
    scrape = (DEPLOY / "prometheus.yml").read_text()
    assert '"server:8000"' in scrape
