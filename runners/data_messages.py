"""Smaller data messages from the Python SDK worker to the runner.

On Flink's batch translation an executable stage runs a whole partition as
one bundle, and the runner (Beam's `BeamFnDataInboundObserver`) decodes a
bundle's outputs only when the bundle closes: until then it holds up to 100
`Elements` messages on the TaskManager's heap, and the worker keeps the
rest in its send queue. The worker coalesces outputs into messages of up to
10 MB (`data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD`), so the heap a slot
needs reached ~1 GB once a stage's output passed 1 GB: the 4M-row scoring
run died of "Java heap space" decoding the outputs of the stage after the
dedupe (bench/RESULTS.md, issue #24). With messages of at most
MESSAGE_BYTES (plus one element) the heap those 100 messages take is
bounded by 100 x (MESSAGE_BYTES + the largest element), whatever the input.

runners/worker_pool.py installs it in each worker it starts.
"""

from apache_beam.runners.worker import data_plane

# 1 MB: 100 queued messages then hold ~100 MB per slot (plus their
# elements' excess, a few MB each: grouped steps emit pieces,
# transforms.common.PIECE_ROWS). Per-message costs stay small beside 1 MB.
MESSAGE_BYTES = 1 << 20


def install(message_bytes: int = MESSAGE_BYTES) -> None:
  """Makes this process's data channels flush (and coalesce) outputs at
  `message_bytes` instead of Beam's 10 MB."""
  # Read at run time when the channel coalesces queued outputs.
  data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD = message_bytes  # pylint: disable=protected-access

  def create(close_callback, flush_callback, data_buffer_time_limit_ms):
    # Beam's ClosableOutputStream.create, with the threshold passed (its
    # default argument was bound when Beam was imported).
    if data_buffer_time_limit_ms > 0:
      return data_plane.TimeBasedBufferingClosableOutputStream(
          close_callback, flush_callback=flush_callback,
          size_flush_threshold=message_bytes,
          time_flush_threshold_ms=data_buffer_time_limit_ms)
    return data_plane.SizeBasedBufferingClosableOutputStream(
        close_callback, flush_callback=flush_callback,
        size_flush_threshold=message_bytes)

  data_plane.ClosableOutputStream.create = staticmethod(create)
