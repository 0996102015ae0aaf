"""benchmarks/ is documented: its README lists every script, and no results file lies at its
root (results go to benchmarks/results/)."""
from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_benchmarks_readme_lists_every_script():
    text = (BENCH / "README.md").read_text()
    missing = [p.name for p in sorted(BENCH.glob("*.py")) if f"`{p.name}`" not in text]
    assert not missing, f"benchmarks/README.md does not list {missing}"


def test_no_results_files_at_the_benchmarks_root():
    stray = [p.name for p in BENCH.iterdir()
             if p.is_file() and p.suffix not in (".py", ".md")]
    assert not stray, f"move {stray} to benchmarks/results/"
