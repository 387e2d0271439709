"""The model registry: every trained model version, and which one serves.

    python -m pipelines.registry list --registry data/registry
    python -m pipelines.registry promote v1234abcd --registry data/registry --reason "beats v99 by 0.01 ROC AUC"
    python -m pipelines.registry rollback --registry data/registry --reason "bad alerts"

A registry is a folder, local or gs://:

    index.json            every version: status, metrics, data and declaration
                          hashes, model type, task, training range, and its
                          history of status changes (when and why)
    models/<version>/     the model directory (as pipelines.train writes it)
    promotions/<n>.json   one pointer per champion change, {"version",
                          "dir"}, numbered: the streaming job watches these
                          to follow the champion without a restart

Statuses: candidate (registered), champion (the one that scores; at most
one), retired (a former champion). The first model registered becomes the
champion; later ones are candidates until promoted. Registering a version
the registry already holds changes nothing (reruns are idempotent).

Times in the index come from the caller (`at`: the run's --reference_time,
else the latest event time of the model's training data), never from the
clock, so the same runs give the same index. The index is written whole to
a temporary file and renamed over the old one (on object stores, one
object upload), so a crash leaves the old index or the new one, never half
of one; a model directory is copied before the index names it.
"""

import sys

from pipelines.model.registry import main

if __name__ == '__main__':
  sys.exit(main())
