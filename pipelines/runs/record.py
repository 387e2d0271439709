"""The end of a batch run, for its history: append the run's line to the
history (pipelines.runs.run_history), then apply --retain_runs
(pipelines.runs.retention). The batch command calls it after the run's
summary is final and before the report is rendered (the report shows the
history as it is after this run)."""

from typing import Any, Dict, List, Optional, Sequence

from pipelines.runs import retention
from pipelines.runs import run_history


def record(history_path: str, summary: Dict[str, Any], output_dir: str,
           retain_runs: Optional[int] = None, registries: Sequence[str] = ()
           ) -> List[str]:
  """Appends the run, applies retention; returns the lines to print
  (History, and Retention when `retain_runs` is set)."""
  broken = run_history.load(history_path).broken
  entry = run_history.append(history_path, summary, output_dir)
  lines = [f'History:               {history_path} (run {entry["seq"]}' +
           (f'; {run_history.skipped_note(broken)})' if broken else ')')]
  if retain_runs:
    retained = retention.retain(history_path, retain_runs, list(registries))
    lines.append(retention.describe(retained, retain_runs))
  return lines
