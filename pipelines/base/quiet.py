"""Silences TensorFlow's and Google clients' start-up noise.

Import this module first in every entry point (before TensorFlow, TFDV,
tf.Transform or Beam's GCP modules are imported): TensorFlow reads
TF_CPP_MIN_LOG_LEVEL once, when its C++ core loads.
"""

import logging
import os
import sys
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')

warnings.filterwarnings('ignore', category=FutureWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)
warnings.filterwarnings('ignore', message='.*IPython.*')


class _DropNoise(logging.Filter):
  """Drops known harmless start-up warnings from the root logger."""
  _NOISE = ('crcmod package not found', 'Unable to import IPython',
            'TFDV visualization APIs', 'tensorflow_decision_forests',
            'Resource module is not available',
            "node's cache key varies on repeated tracing")

  def filter(self, record):
    message = record.getMessage()
    return not any(n in message for n in self._NOISE)


def quiet_logging(level=logging.WARNING):
  """Root logging at `level`, TensorFlow's and absl's at ERROR."""
  logging.getLogger().setLevel(level)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropNoise())
  logging.getLogger().addFilter(_DropNoise())
  for name in ('tensorflow', 'absl', 'apache_beam.io.gcp'):
    logging.getLogger(name).setLevel(logging.ERROR)
    # absl resets its logger's level when it initialises: filter too.
    logging.getLogger(name).addFilter(_DropNoise())
  # A failing bundle is logged by the runner with its traceback before the
  # exception reaches the entry point, which prints one line and writes the
  # traceback to the run's log: the runner's own copy is noise.
  logging.getLogger('apache_beam.runners').setLevel(logging.CRITICAL)


quiet_logging()


def import_tfdv():
  """tensorflow_data_validation, without the IPython notice it writes
  straight to stderr on import (we render our own HTML, not notebooks)."""
  import contextlib
  import io
  with contextlib.redirect_stderr(io.StringIO()):
    import tensorflow_data_validation as tfdv  # pylint: disable=g-import-not-at-top
  return tfdv


def _drop_teardown_noise(unraisable, _default=sys.unraisablehook):
  """A concrete tf.function still referenced when Python tears modules
  down (the scoring model, cached by Beam's shared handle for the whole
  process) runs TensorFlow's AtomicFunction.__del__ after TensorFlow's own
  globals are gone: it raises a TypeError that Python prints as a
  traceback after the run's summary, though nothing failed. Only that
  exception, only at exit, is dropped."""
  if (sys.is_finalizing() and
      getattr(unraisable.object, '__qualname__', '') ==
      'AtomicFunction.__del__'):
    return
  _default(unraisable)


sys.unraisablehook = _drop_teardown_noise
