"""The model on a process of its own, beside the service's event loop.

In one process the event loop (HTTP, validation, the store) and the model
thread share one GIL: each batch's several milliseconds of Python in
history features, the transform graph and the estimator hold the loop's
next request up, and at 200 requests/s the two together wanted more than
one GIL could give (bench/RESULTS.md: p99 31-72 ms). Here the model is
scored by a child process (`multiprocessing`'s spawn: a fresh
interpreter, never a fork of a process that has started TensorFlow's
threads) holding its own Scorer; the loop sends each batch of prepared
requests (plain dicts, pickled) and awaits the answers, so the two run on
two cores. The two talk over one pipe, read on the event loop when it is
readable (no thread of the service's stands between the loop and the
model), one call at a time.

The child also follows the registry's champion when the service does (its
ChampionFollower swaps the child's own model, with the same checks), and
the service asks it which model it serves (`status`). A child that dies
fails the batch it was scoring with a 503 and is started again, and a
child whose service is gone exits.
"""

# Quiet before the child's `_scorer` imports TensorFlow (the child
# imports this module to find `_serve`).
import pipelines.base.quiet  # noqa: F401  pylint: disable=unused-import

import asyncio
import multiprocessing
import sys
from typing import Any, List, Optional, Sequence

from pipelines.base.errors import RunError


class ModelProcessDied(RunError):
  """The model process died while scoring; it is being started again."""
  http_status = 503
  retry_after = 1


def _scorer(schema: str, model_dir: Optional[str], registry: Optional[str],
            poll_seconds: float):
  """In the child: the Scorer, warmed up, and its follower if asked."""
  from pipelines.model.registry import Registry  # pylint: disable=g-import-not-at-top
  from pipelines.serving.champion import ChampionFollower  # pylint: disable=g-import-not-at-top
  from pipelines.serving.loading import freeze_heap, load_model  # pylint: disable=g-import-not-at-top
  from pipelines.serving.scorer import Scorer  # pylint: disable=g-import-not-at-top
  from schemas.dataset import load_dataset  # pylint: disable=g-import-not-at-top
  scorer = Scorer(load_dataset(schema), load_model(
      model_dir or Registry(registry).champion_dir()))
  scorer.warm_up()
  follower = None
  if registry and poll_seconds:
    follower = ChampionFollower(scorer, registry, poll_seconds)
    follower.start()
  freeze_heap()
  return scorer, follower


def _serve(conn, schema, model_dir, registry, poll_seconds):
  """The child's main: loads, says it is ready, then answers each call
  (('predict', rows) -> Scorer.predict's list; ('status', None) ->
  (version, swaps, failed polls)) with (True, value) or (False, error),
  until the pipe closes."""
  _name_process()
  try:
    scorer, follower = _scorer(schema, model_dir, registry, poll_seconds)
  except Exception as e:  # pylint: disable=broad-except
    # The service says it in one line (ModelProcess.start raises it).
    _send(conn, (False, e))
    return

  def status():
    if follower is None:
      return scorer.version, 0, 0
    return scorer.version, follower.swaps, follower.failures
  conn.send((True, status()))
  while True:
    try:
      kind, payload = conn.recv()
    except (EOFError, OSError):
      return     # the service is gone
    try:
      answer = (True, scorer.predict(payload) if kind == 'predict'
                else status())
    except Exception as e:  # pylint: disable=broad-except
      answer = (False, e)
    _send(conn, answer)


def _send(conn, answer):
  try:
    conn.send(answer)
  except (EOFError, OSError):
    pass       # the service is gone: the next recv ends the child
  except Exception as e:  # pylint: disable=broad-except
    # An answer or error that does not pickle: its text instead.
    conn.send((False, RuntimeError(f'{type(e).__name__}: {e}')))


def _name_process():
  """Named mlpipe-model in ps and top (and found by bench.serve)."""
  try:
    with open('/proc/self/comm', 'w') as f:
      f.write('mlpipe-model')
  except OSError:
    pass


class ModelProcess:
  """The service's handle on its model process. `start` (blocking)
  starts the child and waits until its model answers; `predict` and
  `status` are awaited on the event loop, one call at a time."""

  def __init__(self, schema: str, *, model_dir: Optional[str] = None,
               registry: Optional[str] = None, poll_seconds: float = 0.0):
    self._args = (schema, model_dir, registry, poll_seconds)
    self._process = self._conn = None
    self._lock: Optional[asyncio.Lock] = None
    self.restarts = 0

  @property
  def pid(self) -> Optional[int]:
    return self._process.pid if self._process is not None else None

  def start(self):
    context = multiprocessing.get_context('spawn')
    mine, theirs = context.Pipe()
    process = context.Process(target=_serve, args=(theirs,) + self._args,
                              daemon=True, name='mlpipe-model')
    process.start()
    theirs.close()
    try:
      ok, value = mine.recv()     # EOFError: it died while loading
    except EOFError:
      process.join()
      raise RunError('the model process exited while loading the model '
                     f'(exit code {process.exitcode})') from None
    if not ok:
      raise value
    self._process, self._conn = process, mine

  async def predict(self, rows: Sequence[Any]) -> List[Any]:
    return await self._call('predict', list(rows))

  async def status(self):
    """(model version served, champion swaps, failed polls)."""
    return await self._call('status', None)

  async def _call(self, kind: str, payload: Any):
    if self._lock is None:
      self._lock = asyncio.Lock()
    async with self._lock:
      loop = asyncio.get_running_loop()
      if self._conn is None:     # not started by a lifespan: now, once
        await loop.run_in_executor(None, self.start)
      conn = self._conn
      readable = loop.create_future()
      loop.add_reader(conn.fileno(), lambda: readable.done() or
                      readable.set_result(None))
      try:
        conn.send((kind, payload))
        await readable
        ok, value = conn.recv()
      except (EOFError, OSError):
        died = True
      else:
        died = False
      finally:
        loop.remove_reader(conn.fileno())
      if died:
        await self._replace(loop)
        raise ModelProcessDied('the model process died while scoring; it '
                               'was started again: try again')
    if not ok:
      raise value
    return value

  async def _replace(self, loop):
    """A new child for the one that died (under the lock: the calls
    meanwhile wait for it to load)."""
    print('warning: the model process died; starting another',
          file=sys.stderr, flush=True)
    self.restarts += 1
    self._conn.close()
    self._process.join(timeout=5)
    await loop.run_in_executor(None, self.start)

  def stop(self):
    if self._conn is not None:
      self._conn.close()       # the child's recv ends: it exits
      self._process.join(timeout=10)
      if self._process.is_alive():
        self._process.kill()
        self._process.join()
      self._process = self._conn = None
