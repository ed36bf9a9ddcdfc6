"""The README is a short manual, and no file points to a document the repository lacks."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
STAGES = ("extract", "cluster", "evaluate", "report", "train-predictor", "generate")
# Inline links [text](target) and bare mentions of a Markdown file (RELIABILITY.md).
LINK = re.compile(r"\]\(([^)\s]+)\)")
MENTION = re.compile(r"(?<![\w/.-])((?:\.\./)?(?:[\w-]+/)*[\w-]+\.md)\b")
# Markdown files actclust writes into a run's directory: outputs, not documents.
OUTPUTS = ("budgets.md", "trials.md")


def _tracked(*suffixes: str) -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return [REPO / n for n in names if n.endswith(suffixes) and (REPO / n).is_file()]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.M)}


def _resolve(source: Path, target: str) -> Path | None:
    """Where ``target`` named in ``source`` lives: beside it, or from the repository root."""
    for base in (source.parent, REPO, REPO / "docs"):
        candidate = (base / target).resolve()
        if candidate.exists():
            return candidate
    return None


def test_readme_is_a_manual_under_20000_characters():
    text = README.read_text(encoding="utf-8")
    assert len(text) < 20_000, len(text)
    first_screen = text.split("\n## Commands\n", 1)[0]
    for stage in STAGES:
        assert f"`actclust {stage}`" in first_screen, stage
    for needed in ("make demo", "make test", "actclust run --config jobs/presets/tiny.yaml",
                   "runs/tiny/results.csv", "runs/tiny/report.html", "docs/formats.md",
                   "docs/method.md", "docs/results.md"):
        assert needed in first_screen, needed


def test_the_one_minute_example_uses_a_tiny_model():
    preset = (REPO / "jobs" / "presets" / "tiny.yaml").read_text()
    assert re.search(r"^model: tiny:", preset, re.M)
    assert re.search(r"^out: runs/tiny$", preset, re.M)


@pytest.mark.parametrize("source", _tracked(".md"), ids=lambda p: str(p.relative_to(REPO)))
def test_every_markdown_link_resolves(source):
    text = source.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        path, _, anchor = target.partition("#")
        # A link resolves from its own file's folder, as on GitHub.
        found = (source.parent / path).resolve() if path else source
        found = found if found.exists() else None
        if found is None:
            broken.append(target)
        elif anchor and found.suffix == ".md" and anchor not in _anchors(found):
            broken.append(target)
    assert not broken, f"{source.name} links to what does not exist: {broken}"


def test_no_file_mentions_a_document_the_repository_lacks():
    missing = []
    for source in _tracked(".md", ".py", ".yaml", ".sh", "Makefile"):
        for name in MENTION.findall(source.read_text(encoding="utf-8", errors="replace")):
            if not name.endswith(OUTPUTS) and _resolve(source, name) is None:
                missing.append(f"{source.relative_to(REPO)}: {name}")
    assert not missing, missing


def test_every_measured_table_lives_in_results_md_with_a_date():
    results = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", results, flags=re.M)[1:]
    tables = [s for s in sections if "\n| " in s]
    assert tables, "docs/results.md holds no table"
    for section in tables:
        title = section.splitlines()[0]
        assert re.search(r"20\d\d-\d\d-\d\d", title), f"undated section: {title}"
        assert "```sh" in section or "benchmarks/" in section, f"no command: {title}"
    readme = README.read_text(encoding="utf-8")
    measured = re.findall(r"^## (.*\d{4}-\d\d-\d\d.*)$", readme, re.M)
    assert len(measured) == 1, f"the README carries one dated table, not {measured}"
