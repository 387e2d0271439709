"""runners/data_messages.py: an SDK worker's outputs leave in messages of
at most MESSAGE_BYTES (plus one element), not Beam's 10 MB, so the
runner's queue of 100 messages per bundle stays small on its heap."""

from apache_beam.runners.worker import data_plane

from runners import data_messages

ELEMENT = 50_000      # bytes of one encoded element
TOTAL = 60            # elements: 3 MB in all


def _messages():
  """Sizes of the Elements messages a worker's data channel sends for one
  bundle's output of TOTAL elements, written as Beam's operations write
  them (encode, then maybe_flush)."""
  channel = data_plane._GrpcDataChannel()  # pylint: disable=protected-access
  stream = channel.output_stream('bundle-1', 'transform-1')
  for i in range(TOTAL):
    stream.write(bytes([i % 256]) * ELEMENT)
    stream.maybe_flush()
  stream.close()
  channel.close()
  messages = list(channel._write_outputs())  # pylint: disable=protected-access
  data = b''.join(d.data for m in messages for d in m.data)
  assert data == b''.join(bytes([i % 256]) * ELEMENT for i in range(TOTAL))
  return [sum(len(d.data) for d in m.data) for m in messages]


def test_outputs_leave_in_messages_of_at_most_a_megabyte(monkeypatch):
  # Beam's own sizes first: the whole 3 MB in one message.
  assert max(_messages()) == ELEMENT * TOTAL
  # Undone after the test (install patches this process's Beam).
  monkeypatch.setattr(data_plane, '_DEFAULT_SIZE_FLUSH_THRESHOLD',
                      data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD)  # pylint: disable=protected-access
  monkeypatch.setattr(data_plane.ClosableOutputStream, 'create',
                      data_plane.ClosableOutputStream.create)
  data_messages.install()
  sizes = _messages()
  assert len(sizes) >= 3
  assert max(sizes) <= data_messages.MESSAGE_BYTES + ELEMENT
