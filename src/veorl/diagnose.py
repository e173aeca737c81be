"""Print the diagnostics of a world-model or agent artifact: `python -m veorl.diagnose ARTIFACT_DIR [...]`.

Reads ARTIFACT_DIR/diagnostics.json (written at the end of pretraining and of fine-tuning; see
veorl.diagnostics) and prints every figure, marking those that cross their threshold with what it means.
Exit status: 0 when nothing crosses a threshold, 1 when something does, 2 when a file is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from veorl.diagnostics import DIAGNOSTICS_FILE, THRESHOLDS
from veorl.trees import flatten


def render(artifact: Path, diagnostics: dict) -> tuple[str, int]:
    """Text report of one artifact's diagnostics and the number of figures past their threshold."""
    flat = flatten(diagnostics)
    limits = {t.key: t for t in THRESHOLDS}
    lines = [f"{artifact}"]
    crossed = 0
    width = max((len(k) for k in flat), default=0)
    for key, value in flat.items():
        text = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
        mark = ""
        threshold = limits.get(key)
        if threshold is not None and isinstance(value, (int, float)) and threshold.crossed(float(value)):
            crossed += 1
            mark = f"   <-- {threshold.meaning}"
        lines.append(f"  {key.ljust(width)}  {text}{mark}")
    return "\n".join(lines), crossed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m veorl.diagnose",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Thresholds:\n"
        + "\n".join(
            f"  {t.key}: {'< ' + str(t.low) if t.low is not None else '> ' + str(t.high)} means {t.meaning}"
            for t in THRESHOLDS
        ),
    )
    parser.add_argument("artifacts", nargs="+", type=Path, help="world-model or agent directories")
    parser.add_argument("--json", action="store_true", help="print the raw JSON instead of the report")
    args = parser.parse_args(argv)
    status = 0
    for artifact in args.artifacts:
        path = artifact / DIAGNOSTICS_FILE
        if not path.is_file():
            print(
                f"error: {path} not found (diagnostics are written at the end of pretrain and finetune)",
                file=sys.stderr,
            )
            status = 2
            continue
        diagnostics = json.loads(path.read_text())
        if args.json:
            print(json.dumps(diagnostics, indent=2))
            continue
        report, crossed = render(artifact, diagnostics)
        print(report)
        if crossed and status == 0:
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
