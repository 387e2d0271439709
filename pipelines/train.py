"""Trains a scikit-learn model on tf.Transform output, for the label's task.

  python -m pipelines.train --transformed out/transformed \\
      --transform_dir out/transform --model_dir out/model [--model logreg]

Input: transformed rows (columns of
`transforms.preprocess.transformed_arrow_schema`), e.g. the Parquet files the
batch pipeline writes to `transformed/`. Rows without a label are dropped.

Split by time: rows sorted by (event time, id); the earliest
1 - eval_fraction (default 80%) train the model, the latest 20% evaluate it.
A dataset without a timestamp is split at random instead, stratified by
class and seeded (`stratified_split`); the metadata says which split.

Tasks (the label's declaration): binary (ROC/PR AUC, precision and recall
at the threshold, Brier, reliability), multiclass (macro one-vs-rest ROC
AUC, log loss, accuracy), regression (RMSE, MAE, R2).

Threshold (binary): chosen on the training split only. The model is first fitted on
the earliest 80% of the training split; the threshold maximising F1 on the
remaining (later) 20% of the training split is kept; the final model is then
refitted on the whole training split. Evaluation metrics never influence it.

Models (deterministic, random_state=0):
  gbt     HistGradientBoostingClassifier; vocabulary indices are declared
          categorical, quantile buckets stay ordinal.
  logreg  LogisticRegression on one-hot vocabulary and bucket indices plus
          the z-scored numeric columns.

Writes model_dir/: model.skops, transform_fn/ (copy of the tft output dir:
transform_fn/ and transformed_metadata/), metadata.json (see `train`).
"""

import sys

from pipelines.model.training import main

if __name__ == '__main__':
  sys.exit(main())
