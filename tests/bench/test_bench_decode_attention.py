"""The decode-attention micro-benchmark runs end to end (baseline from git, same source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from elasticserve.bench import decode_attention
from elasticserve.kernels import native


@pytest.mark.skipif(not native.available(), reason="no C compiler for the kernel")
def test_same_source_against_itself(capsys: pytest.CaptureFixture[str]) -> None:
    """Baseline HEAD's kernel vs the working tree's (unchanged in a clean checkout: identical
    outputs) at one tiny shape; the row reports both runs and the engine's call."""
    assert decode_attention.main(["--batches", "2", "--contexts", "20", "--rounds", "1",
                                  "--baseline", "HEAD", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 2 | 20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 10 and cells[-2].endswith("x")
    assert all(float(c) > 0 for c in cells[2:8])


@pytest.mark.skipif(not native.available(), reason="no C compiler for the kernel")
def test_write_docs_puts_the_table_in_its_section(tmp_path: Path) -> None:
    docs = tmp_path / "BENCHMARKS.md"
    assert decode_attention.main(["--batches", "1", "--contexts", "16", "--rounds", "1",
                                  "--baseline", "HEAD", "--write-docs",
                                  "--docs-path", str(docs)]) == 0
    text = docs.read_text()
    assert "<!-- bench:decode-attention -->" in text and "| 1 | 16 |" in text
    assert "--baseline HEAD" in text
