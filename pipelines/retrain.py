"""Retraining on a policy: decide, train a challenger, compare, promote.

  python -m pipelines.retrain --registry data/registry \\
      --run_dir data/scored --input 'data/latest/*.jsonl' \\
      --policy retrain.yaml --output_dir data/retrain

Reads the latest scoring run's reports (`<run_dir>/validation/drift.json`,
`skew.json`) and its monitoring report (`--monitoring`, by default
`<run_dir>/monitoring/report.json`), and asks the policy (a small YAML,
`load_policy`) whether any trigger fires. When one does:

  1. a challenger is trained on --input (the latest labelled window) by
     `pipelines.batch` with --registry, which registers it as a candidate
     (or --challenger names a candidate already registered);
  2. champion and challenger score the same rows: the run's feature rows
     (`<run_dir>/features/`) that have a label (--labels, else the rows'
     own label column) and whose event time is after both models'
     training data (each model's `train_time_range`), so neither model is
     judged on rows it learned from; both on the driver with
     `transforms.inference.predict_table`;
  3. the challenger is promoted (`Registry.promote`) only when its metric
     beats the champion's by at least `promote_margin` on at least
     `min_eval_rows` rows with `min_eval_positives` positives.

Every decision, "no retrain needed" included, is written with its reasons
to `<output_dir>/retrain/decision.json` and appended to
`<registry>/decisions.jsonl`. Times come from --reference_time, else the
latest event time of the run's feature rows, never from the clock.

Exit codes: 0 a decision was written; 2 bad flags, policy or inputs (one
line on stderr); 3 a failure (one line; the traceback in
<output_dir>/retrain/retrain.log).
"""

import sys

from pipelines.model.retraining import main

if __name__ == '__main__':
  sys.exit(main())
