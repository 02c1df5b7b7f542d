"""The README's side-by-side summary of ``sinkinterp report`` runs: one column per report folder,
one row per stage (what it found, from ``summary_rows``, and how long it took), then the total run
time and the sizes. Reads only what the reports saved; runs nothing.

    python scripts/report_table.py reports/smollm2-135m reports/gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkinterp.errors import SinkInterpError
from sinkinterp.experiments.battery import REPORT_STAGES, summary_rows


def load_report(folder: Path) -> tuple[dict, dict[str, dict]]:
    """(report.json, {stage: its saved record}) of one report folder. report.json holds every
    stage's record and seconds (only the figures and the page's HTML are left out)."""
    path = folder / "report.json"
    if not path.is_file():
        raise SinkInterpError(f"report folder {str(folder)!r} has no report.json: run `sinkinterp report --out` there first")
    report = json.loads(path.read_text())
    return report, report["stages"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(folders: list[Path]) -> str:
    loaded = [load_report(folder) for folder in folders]
    names = [report["model"].get("model") or str(folder) for (report, _), folder in zip(loaded, folders)]
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    summaries = [dict(summary_rows(records)) for _, records in loaded]
    for stage in REPORT_STAGES:
        cells = []
        for summary, (_, records) in zip(summaries, loaded):
            cells.append(f"{_cell(summary[stage])} ({records[stage]['seconds']:.0f} s)" if stage in summary else "not run")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [sum(r["seconds"] for r in records.values()) for _, records in loaded]
    lines.append("| run time, all stages | " + " | ".join(f"{t / 60:.1f} min ({t:.0f} s)" for t in totals) + " |")
    sizes = [", ".join(f"{k} {v}" for k, v in report["sizes"].items()) for report, _ in loaded]
    lines.append("| sizes | " + " | ".join(sizes) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="report folders (each with report.json)")
    print(markdown(parser.parse_args().folders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
