"""Register an evaluated agent in the MLflow model registry; promote it to @champion only when it wins.

    python -m components.register --agent models/agent --evaluation eval --out eval/registration.json

The agent is logged as an MLflow pyfunc model (observation + recurrent state -> action + new state) and
registered as a new version of `register.model_name`, tagged with its evaluation metrics and provenance.
It becomes @champion when its evaluation beats the current champion's `register.metric` by more than
`register.margin` under the same evaluation protocol; otherwise @challenger (or no alias when the
evaluation is missing, failed or of another task), with the reason tagged and written to --out.
Before anything is promoted the evaluation's evidence is checked (veorl.registry.check_evidence): the summary
must match the per-episode records in episodes.csv, the files must match the content hash recorded by
components.evaluate, and its provenance must name this agent. Otherwise the registration is refused: no alias,
a `veorl.refused` tag on the version, the reason in --out, and exit status 3.
Re-running with the same agent and evaluation changes nothing. Concurrent registrations leave exactly one
champion (see veorl.registry). The store is MLFLOW_TRACKING_URI, else tracking.uri (sqlite:///mlruns.db).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from veorl.config import Params
from veorl.runtime import add_component_args, parse_component_args
from veorl.storage import atomic_write_json, provenance, redact

log = logging.getLogger("veorl.register")

SECTIONS = ("register", "tracking")
EXIT_REFUSED = 3


class RegistrationRefused(RuntimeError):
    """The evaluation's evidence does not support it (see veorl.registry.check_evidence); nothing was promoted."""


def run(agent: str, evaluation: str, out: str, params: Params, *, parent_run_id: str | None = None) -> dict[str, Any]:
    """Register `agent` with the evaluation in `evaluation`; write the outcome to `out` (JSON) and return it."""
    from veorl.registry import register_agent
    from veorl.tracking import public_params

    params = public_params(params)  # credentials in tracking.uri: for the connection only, not for the outcome file
    outcome = register_agent(agent, evaluation, params, parent_run_id=parent_run_id)
    # --out is a single file inside the evaluation's directory, so provenance travels inside it rather than as
    # config.json/provenance.json files that would overwrite the evaluation's own.
    outcome["provenance"] = provenance(
        params.section_dict(*SECTIONS),
        upstream={"agent": outcome["agent_hash"], "evaluation": outcome["evaluation_hash"]},
    )
    atomic_write_json(Path(out), outcome)
    if outcome.get("refused"):
        raise RegistrationRefused(
            f"{outcome['model_name']} v{outcome['version']} refused, no alias set: {outcome['refused']}"
        )
    return outcome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.register",
        description="Log an evaluated agent as an MLflow pyfunc model, register a version and move @champion to it "
        "only when its evaluation beats the champion's (same protocol, register.metric, register.margin).",
    )
    parser.add_argument(
        "--agent", required=True, help="agent artifact directory (agent.pt + agent.json), e.g. models/agent"
    )
    parser.add_argument("--evaluation", required=True, help="evaluation directory holding metrics.json, e.g. eval")
    parser.add_argument("--out", required=True, help="registration outcome JSON to write, e.g. eval/registration.json")
    add_component_args(parser, progress=False, tracking=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    from veorl.registry import RegistryError

    try:
        outcome = run(args.agent, args.evaluation, args.out, params, parent_run_id=args.parent_run_id)
    except RegistryError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except RegistrationRefused as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # MLflow/S3 failures: report without echoing any credential from the environment
        print(f"error: registration failed: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return 1
    alias = outcome["alias"] or "no alias"
    print(
        f"{outcome['model_name']} v{outcome['version']}: {alias} ({outcome['reason']})"
        + ("" if outcome["new_version"] else " [already registered]")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
