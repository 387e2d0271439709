"""Shared test setup: TensorFlow start-up noise off before anything imports it."""

import pipelines.base.quiet  # noqa: F401  pylint: disable=unused-import

# Four batch runs shared by the report, metrics and history tests.
from tests.report_runs import report_runs  # noqa: E402,F401  pylint: disable=unused-import
# A PostgreSQL cluster for the session (tests/test_postgres.py).
from tests.postgres_server import postgres  # noqa: E402,F401  pylint: disable=unused-import
