"""Every reference to a document resolves inside the repository.

Code, tests, benchmarks and the README cite the design documents as ``docs/<file>.md`` (optionally with
sections: ``docs/spec.md §3``, ``§5-8``, ``§5, §6, §8``). Each cited file must exist and each cited
section must be a ``§N`` heading of it. A citation of a document a clone does not have (the team's
private SPEC/FACTS/DESIGN briefings, their ``shared/`` folder) or of an issue-tracker number fails:
a reader of the code must be able to follow every reference from a clone alone.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# what is scanned: the repository's own text, not generated results or build outputs
_SCAN = ["fused_optim", "csrc", "tests", "bench", "examples", "docs", ".ci", "README.md", "setup.py",
         "pyproject.toml"]
_TEXT = {".py", ".h", ".cpp", ".cu", ".cuh", ".md", ".toml", ".txt", ".sh", ""}
_SKIP_DIRS = {"__pycache__", "results", ".ext_cache", "build"}

_SECTION_HEADING = re.compile(r"^#{1,6}\s+§(\d+)\b", re.M)
# a document reference and the run of section numbers after it, up to the end of the clause
_DOC_REF = re.compile(r"\bdocs/([\w.-]+?\.md)\b((?:[^\n).;]|\.(?=\w))*)")
_DOC_LOCAL_REF = re.compile(r"(?<![/\w])([\w-]+\.md)\b((?:[^\n).;\]]|\.(?=\w))*)")
_SECTIONS = re.compile(r"§(\d+)(?:\s*[-–]\s*§?(\d+))?")
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# documents that are not in the repository
_PRIVATE = re.compile(r"\b(?:SPEC|FACTS|DESIGN)(?:\.md)?\b|\bshared/seeds\b|/work/shared\b")
# this project's issue-tracker numbers: "issue #6", "(issue 4)", "(#12)", "gh-3" (not the verb: "a step
# issues 2 launches"; an upstream project's PR named with its project, "torch PR #167507", is a public
# reference and stays)
_ISSUE = re.compile(r"(?i)\bissues?\s*#\d+|\bissues?\s+\d+\b(?!\s+[a-z])|\(#\d+\)|\bgh-\d+\b")


def _files() -> list[Path]:
    out = []
    for name in _SCAN:
        top = ROOT / name
        if top.is_file():
            out.append(top)
            continue
        if not top.is_dir():
            continue
        for p in sorted(top.rglob("*")):
            if (p.is_file() and p.suffix in _TEXT and not (_SKIP_DIRS & set(p.relative_to(ROOT).parts))
                    and p != Path(__file__).resolve()):  # this file spells out what it looks for
                out.append(p)
    return out


def _sections(doc: Path) -> set[int]:
    return {int(n) for n in _SECTION_HEADING.findall(doc.read_text(encoding="utf-8"))}


def _cited(tail: str) -> list[int]:
    out = []
    for a, b in _SECTIONS.findall(tail):
        out.extend(range(int(a), int(b or a) + 1))
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _problems() -> dict[str, list[str]]:
    """Every broken reference, by kind (one message per occurrence: file:line and what is wrong)."""
    out: dict[str, list[str]] = {"missing document": [], "missing section": [], "orphan section": [],
                                 "private document": [], "issue number": [], "broken link": []}
    sections: dict[Path, set[int]] = {}

    def resolve(doc: Path, tail: str, where: str) -> None:
        if not doc.is_file():
            out["missing document"].append(f"{where}: {doc.relative_to(ROOT)}")
            return
        have = sections.setdefault(doc, _sections(doc))
        for n in _cited(tail):
            if n not in have:
                out["missing section"].append(f"{where}: {doc.relative_to(ROOT)} §{n}")

    for path in _files():
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8", errors="replace")
        in_docs = rel.parts[0] == "docs"
        covered = [False] * len(text)
        refs = list(_DOC_REF.finditer(text))
        if in_docs:  # inside docs/ a sibling is named by its file name: "spec.md §3"
            refs += [m for m in _DOC_LOCAL_REF.finditer(text) if (DOCS / m.group(1)).is_file()]
        for m in refs:
            doc = (ROOT / "docs" / m.group(1)) if m.re is _DOC_REF else DOCS / m.group(1)
            resolve(doc, m.group(2), f"{rel}:{_line(text, m.start())}")
            for i in range(m.start(2), m.end(2)):
                covered[i] = True
        for m in _SECTIONS.finditer(text):
            if covered[m.start()]:
                continue
            if in_docs and _SECTION_HEADING.search(text):  # a document's own sections
                resolve(path, m.group(0), f"{rel}:{_line(text, m.start())}")
            else:
                out["orphan section"].append(f"{rel}:{_line(text, m.start())}: {m.group(0)} names no document")
        for m in _PRIVATE.finditer(text):
            out["private document"].append(f"{rel}:{_line(text, m.start())}: {m.group(0)!r}")
        for m in _ISSUE.finditer(text):
            out["issue number"].append(f"{rel}:{_line(text, m.start())}: {m.group(0)!r}")
        if path.suffix == ".md":
            for m in _MD_LINK.finditer(text):
                target = m.group(1).split("#", 1)[0]
                if not target or "://" in target or target.startswith("mailto:"):
                    continue
                if not (path.parent / target).exists():
                    out["broken link"].append(f"{rel}:{_line(text, m.start())}: {m.group(1)}")
    return out


@pytest.fixture(scope="module")
def problems() -> dict[str, list[str]]:
    return _problems()


def test_docs_exist_and_spec_has_its_sections():
    assert (DOCS / "README.md").is_file()
    assert set(range(10)) <= _sections(DOCS / "spec.md"), "docs/spec.md must keep its sections §0-§9"


@pytest.mark.parametrize("kind", ["missing document", "missing section", "orphan section", "broken link"])
def test_every_document_reference_resolves(problems, kind):
    assert not problems[kind], f"{kind}:\n" + "\n".join(problems[kind])


def test_no_private_documents_are_cited(problems):
    """SPEC/FACTS/DESIGN were the team's briefings; the repository's versions are docs/spec.md,
    docs/toolchain.md and docs/design.md."""
    assert not problems["private document"], "\n".join(problems["private document"])


def test_no_issue_numbers(problems):
    """An issue number means nothing to a reader of a clone: say the reason in words."""
    assert not problems["issue number"], "\n".join(problems["issue number"])


def test_the_checker_catches_what_it_should(tmp_path, monkeypatch):
    """The patterns themselves: a broken section, an orphan §, a private citation and an issue number are
    each reported; resolved references are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "spec.md").write_text("# spec\n## §0. A\n## §1. B\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "x.py").write_text(
        "# ok: docs/spec.md §0-1, docs/spec.md §1\n"
        "# bad: docs/spec.md §2\n"
        "# bad: docs/nope.md\n"
        "# bad: see §1 alone\n"
        "# bad: SPEC §1, FACTS.md\n"
        "# bad: (issue #6), (#7) and issue 8.\n"
        "# ok: torch PR #167507, color '#000000', a step issues 2 launches\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "DOCS", tmp_path / "docs")
    got = _problems()
    assert [s.split(": ", 1)[1] for s in got["missing section"]] == ["docs/spec.md §2"]
    assert [s.split(": ", 1)[1] for s in got["missing document"]] == ["docs/nope.md"]
    assert len(got["orphan section"]) == 2  # "§1 alone", and SPEC's §1
    assert len(got["private document"]) == 2
    assert [s.split(": ", 1)[1] for s in got["issue number"]] == ["'issue #6'", "'(#7)'", "'issue 8'"]
