"""deploy/grafana/elasticserve.json asks only for metrics the server really exports: every PromQL
query (panel targets and template variables) is parsed for metric names, which must appear in
a live GET /metrics. New panels and new metrics are checked the same way."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "elasticserve.json"
# words of PromQL that are neither functions (followed by "(") nor metric names
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "inf", "nan", "atan2"}
# a series name per sample suffix of each metric type
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($model, $__rate_interval)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", expr):
        if not expr[match.end():].lstrip().startswith("(") and match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target (rows included) and query variable."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield f"panel {panel['title']!r} {target.get('refId')}", target["expr"]

    yield from walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # label_values(METRIC_EXPR, label): only the first argument names metrics
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
            yield f"variable {var['name']!r}", inner.group(1) if inner else query


def exported(text: str) -> set[str]:
    """Series names of a /metrics exposition, with every suffix each family's type implies."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(a:b_bucket{model=~"$model"}'
            '[$__rate_interval]))) / on(model) group_left c_total offset 5m + 1e3 * d')
    assert metric_names(expr) == {"a:b_bucket", "c_total", "d"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_query_names_exported_metrics(dashboard: dict[str, Any], base_url: str) -> None:
    resp = httpx.get(f"{base_url}/metrics", timeout=30)
    assert resp.status_code == 200
    served = exported(resp.text)
    found = list(queries(dashboard))
    assert len(found) >= 10  # the walk really reached the panels
    for where, expr in found:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= served, f"{where}: {sorted(names - served)} not in /metrics"


def test_panels_use_the_datasource_variable_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), panel["title"]
        pos = panel["gridPos"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells and pos["x"] + pos["w"] <= 24, panel["title"]
        cells |= mine


def test_queries_select_models_by_vllms_label(dashboard: dict[str, Any]) -> None:
    # the server labels every per-model series model_name (vLLM's label), not model
    for where, expr in queries(dashboard):
        assert not re.search(r"\bmodel\b(?!_)", expr), f"{where}: {expr}"
