"""Print the pinned dependencies of pyproject.toml (plus chosen extras), one per line, for `pip install -r`.

The images install dependencies from pyproject.toml alone, before the source is copied, so the heavy layer is
rebuilt only when the pins change:  python requirements_from_pyproject.py pyproject.toml --extra envs
"""

import argparse
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no optional dependency group {unknown} (has {sorted(optional)})")
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines.extend(optional[extra])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", help="path to pyproject.toml")
    parser.add_argument(
        "--extra", action="append", default=[], help="optional dependency group to include (repeatable)"
    )
    args = parser.parse_args(argv)
    sys.stdout.write("".join(line + "\n" for line in requirements(args.pyproject, args.extra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
