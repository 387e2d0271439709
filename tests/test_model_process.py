"""The model process's side of the pipe (`model_process._serve`), run on a
thread of the test with a stand-in Scorer: what goes back for a load
error, a scoring error and an answer that does not pickle, and that it
ends when the service's end of the pipe closes. The real child is tested
through the service in tests/test_serve.py."""

import multiprocessing
import threading

import pytest

from pipelines.serving import model_process
from transforms.online_store import BadStoredValue


class _Scorer:
  version = 'v1'

  def predict(self, rows):
    if rows == ['bad state']:
      raise BadStoredValue('the state of u1 is not the documented JSON')
    if rows == ['no pickle']:
      return [lambda: None]
    return [f'score of {r}' for r in rows]


def _child(monkeypatch, scorer=None, error=None):
  """(the service's end of the pipe, the thread running _serve)."""

  def load(*args):
    if error is not None:
      raise error
    return scorer, None
  monkeypatch.setattr(model_process, '_scorer', load)
  monkeypatch.setattr(model_process, '_name_process', lambda: None)
  mine, theirs = multiprocessing.Pipe()
  thread = threading.Thread(target=model_process._serve,  # pylint: disable=protected-access
                            args=(theirs, 'transactions', 'm', None, 0.0),
                            daemon=True)
  thread.start()
  return mine, thread


def test_the_child_answers_scores_errors_and_ends_with_the_pipe(monkeypatch):
  conn, thread = _child(monkeypatch, scorer=_Scorer())
  assert conn.recv() == (True, ('v1', 0, 0))        # ready
  conn.send(('predict', ['a', 'b']))
  assert conn.recv() == (True, ['score of a', 'score of b'])
  conn.send(('predict', ['bad state']))
  ok, error = conn.recv()
  # The project's own error, so the service answers it as it would have.
  assert not ok and isinstance(error, BadStoredValue)
  assert error.http_status == 500
  assert str(error) == 'the state of u1 is not the documented JSON'
  conn.send(('predict', ['no pickle']))
  ok, error = conn.recv()
  assert not ok and isinstance(error, RuntimeError)
  conn.send(('status', None))
  assert conn.recv() == (True, ('v1', 0, 0))        # still serving
  conn.close()                                      # the service is gone
  thread.join(timeout=10)
  assert not thread.is_alive()


def test_a_load_error_goes_to_the_service_and_the_child_ends(monkeypatch):
  conn, thread = _child(monkeypatch, error=model_process.RunError(
      'model m holds model v2, the index says v3'))
  ok, error = conn.recv()
  assert not ok and str(error) == 'model m holds model v2, the index says v3'
  thread.join(timeout=10)
  assert not thread.is_alive()


def test_start_raises_what_the_child_could_not_load(monkeypatch):
  """ModelProcess.start raises the child's error itself (one line for
  the command), with a real spawned child that fails at once: a model
  folder that does not exist."""
  process = model_process.ModelProcess('transactions',
                                       model_dir='/nonexistent/model')
  with pytest.raises(Exception) as raised:
    process.start()
  assert '/nonexistent/model' in str(raised.value)
  assert process.pid is None
