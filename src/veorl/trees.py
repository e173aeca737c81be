"""Nested dictionaries (configs, metrics) as flat dotted keys: what checkpoints, MLflow and KFP metrics read."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty dictionaries stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def numeric_leaves(tree: dict[str, Any]) -> dict[str, float]:
    """Nested metrics -> {"a.b": value} for their numeric leaves (booleans left out), e.g. for final metrics."""
    return {k: float(v) for k, v in flatten(tree).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


__all__ = ["flatten", "numeric_leaves"]
