"""How every benchmark reports: one JSON line on stdout, ``bench/results/NAME.json``, and a Markdown summary of all
results so far (``bench/results/SUMMARY.md``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def emit(report: dict[str, Any], results_dir: str | Path = RESULTS_DIR) -> Path:
    """Print ``report`` as one line, write it to ``results_dir/<bench>.json`` and refresh the summary there."""
    print(json.dumps(report), flush=True)
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{report['bench']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (results / "SUMMARY.md").write_text(render_summary(results))
    return path


def add_output_args(parser: argparse.ArgumentParser, *, strict: bool = True) -> None:
    """``--results-dir`` (and ``--strict`` where the benchmark's goals say whether they were met)."""
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where NAME.json and SUMMARY.md go")
    if strict:
        parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")


def finish(report: dict[str, Any], args: argparse.Namespace) -> int:
    """Emit ``report``; the exit status is 1 only under ``--strict`` with a goal missed."""
    emit(report, args.results_dir)
    goals = report.get("goals", {}).values()
    if getattr(args, "strict", False) and not all(g.get("met", True) for g in goals if isinstance(g, dict)):
        return 1
    return 0


def _goal_text(goal: Any) -> str:
    if isinstance(goal, dict):
        met = goal.get("met")
        mark = "" if met is None else (" (met)" if met else " (missed)")
        return f"{goal.get('goal', '')}{mark}"
    return str(goal)


def render_summary(results_dir: str | Path) -> str:
    """A Markdown table of every benchmark's ratios and goals found in ``results_dir``."""
    lines = ["# Benchmark results", "", "| bench | ratio | value | goal |", "|---|---|---|---|"]
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        goals = report.get("goals", {}) or {}
        for name, value in (report.get("ratios", {}) or {}).items():
            lines.append(f"| {report.get('bench', path.stem)} | {name} | {value} | {_goal_text(goals.get(name, ''))} |")
        for name, goal in goals.items():
            if name not in (report.get("ratios") or {}):
                figure = (report.get("figures") or {}).get(name, "")
                lines.append(f"| {report.get('bench', path.stem)} | {name} | {json.dumps(figure)} | {_goal_text(goal)} |")
    lines.append("")
    return "\n".join(lines)
