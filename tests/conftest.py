"""Shared test setup: one OpenMP thread and TensorFlow start-up noise off,
before anything imports scikit-learn or TensorFlow."""

import os

# scikit-learn's HistGradientBoosting (the gbt model) and its predictions
# run OpenMP loops with a barrier per tree node. With one thread per core
# on a machine whose cores are busy (the suite runs at nice 19 beside other
# jobs) every barrier waits for a descheduled thread: fitting the tests'
# 1,200 rows took 97-167 s with two threads and 5 s with one (load 19-26).
# Child processes (pipelines.batch or .streaming in a subprocess, Flink's
# worker pool) inherit it, so a model trained there is the same model.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pipelines.base.quiet  # noqa: E402,F401  pylint: disable=unused-import

# Four batch runs shared by the report, metrics and history tests.
from tests.report_runs import report_runs  # noqa: E402,F401  pylint: disable=unused-import
# The tf.Transform output and gbt model of test_train_inference and
# test_flink_kafka.
from tests.trained_model import trained  # noqa: E402,F401  pylint: disable=unused-import
# A PostgreSQL cluster for the session (tests/test_postgres.py).
from tests.postgres_server import postgres  # noqa: E402,F401  pylint: disable=unused-import
