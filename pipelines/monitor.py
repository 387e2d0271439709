"""Model monitoring: a run's predictions joined with labels that arrive later.

  python -m pipelines.monitor --predictions data/scored/predictions \\
      --labels 'labels/*.jsonl' --registry models/ --output_dir data/scored

Predictions: the Parquet files a batch run writes to `predictions/` (a
folder or a glob), from one model version. Labels: files in any input
format the project reads (JSON lines, CSV, Avro, Parquet) holding the id
field, the label field in its declared raw type and, when the dataset has
one, the timestamp (for the per-day trend). Each label row is checked by
the project's parser against the declaration's id, label and timestamp
fields; a row it rejects is counted by kind, not used.

The join is by id, on whole Arrow columns (`pyarrow.compute.index_in`):
the first copy of an id wins on either side and later copies are counted
(`prediction_duplicates`, `label_duplicates`, `label_conflicts` when a
copy's label differs); labels whose id no prediction has and predictions
without a label are counted, never dropped silently.

The model (for its threshold and its eval-split score distribution) is the
one that made the predictions: with --registry, the registry's entry of the
predictions' model_version; with --model_dir, that folder, whose version
must be the predictions'.

Writes <output_dir>/monitoring/report.json (`report` documents its keys).
Binary tasks only. Exit codes: 0 done; 2 bad flags or inputs (one line on
stderr); 3 a failure (one line, the traceback in
<output_dir>/monitoring/monitor.log).
"""

import sys

from pipelines.model.monitoring import main

if __name__ == '__main__':
  sys.exit(main())
