"""benchmarks/ is documented: its README lists every script, names for each retired script
result files that exist, every benchmark script the docs name is either kept or listed as
retired, and no results file lies at its root (results go to benchmarks/results/)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _retired_section() -> str:
    text = (BENCH / "README.md").read_text()
    assert "## Retired scripts" in text, "benchmarks/README.md has no 'Retired scripts' section"
    return text.split("## Retired scripts", 1)[1]


def _expand(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``[abd, acd]`` (shell brace expansion, nested braces not needed)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",")
            for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def test_benchmarks_readme_lists_every_script():
    text = (BENCH / "README.md").read_text()
    missing = [p.name for p in sorted(BENCH.glob("*.py")) if f"`{p.name}`" not in text]
    assert not missing, f"benchmarks/README.md does not list {missing}"


def test_retired_scripts_are_gone_and_their_results_exist():
    retired = _retired_section()
    rows = [line for line in retired.splitlines() if line.startswith("| `")]
    assert rows, "no retired scripts listed"
    for row in rows:
        script = re.match(r"\| `([\w.]+\.py)`", row).group(1)
        assert not (BENCH / script).exists(), f"{script} is listed as retired but still there"
        for pattern in re.findall(r"`(results/[^`\s]+)`", row):
            for path in _expand(pattern):
                assert list(BENCH.glob(path)), f"{script}: {path} not in benchmarks/"


def test_docs_name_only_kept_or_retired_scripts():
    retired = _retired_section()
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for name in sorted(set(re.findall(r"benchmarks/(\w+\.py)", doc.read_text()))):
            assert (BENCH / name).is_file() or f"`{name}`" in retired, \
                f"{doc.name} names benchmarks/{name}, neither kept nor listed as retired"


def test_no_results_files_at_the_benchmarks_root():
    stray = [p.name for p in BENCH.iterdir()
             if p.is_file() and p.suffix not in (".py", ".md")]
    assert not stray, f"move {stray} to benchmarks/results/"
