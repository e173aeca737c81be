"""The documentation stays consistent with the code that cites it, and the shipped files name no machine's paths."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD_DOC = REPO / "docs" / "method.md"

# `docs/method.md ("Heading")` or `docs/method.md, "Heading"`, possibly across a line break of a docstring.
SECTION_REFERENCE = re.compile(r'docs/method\.md\s*(?:\(\s*|,\s*)"([^"\n]+)"')
# An absolute path of one machine's checkout or home: /work/..., /root/..., /home/<user>/... . A path that merely
# contains such a folder further down (/app/work/clips, $PWD/work) is not one.
MACHINE_PATH = re.compile(r"(?<![\w.~$/-])/(?:work|root|home)/")
# What is shipped or read by people: the package, the pipeline steps, the pipeline definition, the docs.
SHIPPED = ("src", "components", "pipelines", "docs", "README.md")
SKIPPED_PARTS = ("__pycache__", ".pytest_cache", ".ruff_cache")


def method_headings(text: str) -> set[str]:
    """Every Markdown heading of `text` (outside fenced code blocks), without its '#' marks."""
    headings, fenced = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match and not fenced:
            headings.add(match.group(1))
    return headings


def section_references(text: str) -> list[str]:
    """The method-doc section names quoted in `text`."""
    return SECTION_REFERENCE.findall(text)


def shipped_text_files() -> list[Path]:
    """The text files under SHIPPED (build outputs and binary files such as figures left out)."""
    files = []
    for name in SHIPPED:
        root = REPO / name
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            parts = path.relative_to(REPO).parts
            if any(part in SKIPPED_PARTS or part.endswith(".egg-info") for part in parts):
                continue
            data = path.read_bytes()
            if b"\0" in data:
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def test_the_patterns_find_what_they_should():
    assert method_headings("# A\ntext\n## B c ##\n```\n# a comment\n```\n#not a heading\n") == {"A", "B c"}
    assert section_references('See docs/method.md ("Networks"): x.\nmethod doc: docs/method.md,\n"Phase 3").') == [
        "Networks",
        "Phase 3",
    ]
    assert section_references("See docs/method.md (phase 2): unquoted, a pointer rather than a section name") == []
    # built from parts so that this file itself names no machine's path
    work, root, home = "/" + "work/", "/" + "root/", "/" + "home/"
    for path in (f"{work}checkout/src", f"at {root}.cache", f"({home}user/x)", f'"{work}x"', f"`{home}a/b`"):
        assert MACHINE_PATH.search(path), path
    for path in ("/app/work/clips", "$PWD/work:/app/work", "s3://bucket/work/x", "~/work/x", "./work/x", "/workspace"):
        assert not MACHINE_PATH.search(path), path


def test_every_cited_method_doc_section_exists():
    headings = method_headings(METHOD_DOC.read_text(encoding="utf-8"))
    cited: dict[str, list[str]] = {}
    for path in sorted((REPO / "src" / "veorl").rglob("*.py")):
        for name in section_references(path.read_text(encoding="utf-8")):
            cited.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert cited, "no docstring cites a docs/method.md section: has the citation style changed?"
    missing = {name: files for name, files in cited.items() if name not in headings}
    assert not missing, f"cited sections that are no heading of docs/method.md: {missing}"


def test_no_shipped_file_names_a_machine_path():
    found = []
    for path in shipped_text_files():
        text = path.read_text(encoding="utf-8")
        for m in MACHINE_PATH.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{path.relative_to(REPO)}:{line}: {text[m.start() :].splitlines()[0][:60]}")
    assert not found, "absolute paths of one machine in shipped files:\n" + "\n".join(found)


def test_the_machine_path_check_covers_the_shipped_files():
    names = {str(p.relative_to(REPO)) for p in shipped_text_files()}
    assert {"README.md", "docs/method.md", "src/veorl/__init__.py"} <= names
    assert any(n.startswith("components/") for n in names) and any(n.startswith("pipelines/") for n in names)
