"""Shared test setup: TensorFlow start-up noise off before anything imports it."""

import pipelines.quiet  # noqa: F401  pylint: disable=unused-import
