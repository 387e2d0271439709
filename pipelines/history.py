"""The run history: one JSON line per batch run, and its trend.

    python -m pipelines.history --runs data/runs.jsonl

Each batch run appends one line to its history file: `--history`, by
default `runs.jsonl` in the parent of `--output_dir` (the output root that
holds one folder per run: data/run1, data/run2 -> data/runs.jsonl). A line
is {"seq", "output_dir", "status", "health", "summary"}: `seq` numbers the
runs of the file (1, 2, ...; no clock), `summary` is the run's
run_summary.json. `--retain_runs` (pipelines.runs.retention) removes the lines
of the runs it deletes.
"""

import sys

from pipelines.runs.run_history import main

if __name__ == '__main__':
  sys.exit(main())
