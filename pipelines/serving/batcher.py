"""Scoring concurrent requests together: one model call per batch."""

import asyncio
import concurrent.futures
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from pipelines.serving import model_process


class Batcher:
  """Scores concurrent requests together.

  A request's handler prepares it on the event loop (validation, store
  read) and awaits `score(item)`; items wait in a list while the model
  thread scores the previous batch (and `window` seconds more after the
  first, if set); then up to `max_rows` of them go to `predict` in one
  call on one worker thread (`Scorer.predict`: history features, the
  transform graph and the estimator, each once per batch), and each
  handler gets its own result back. A call that fails is made again per
  row, so a row that cannot be scored fails its own request only. One call per batch pays the fixed
  cost of each step once (a one-row model call costs about what a 16-row
  call costs), and the event loop keeps reading and preparing requests
  while the model thread scores.

  With `processes` (model_process.ModelProcess), batches are scored
  there instead, each by a process that is free, and `predict` is not
  used: the loop and the model then hold a GIL each. A batch whose
  process died fails with ModelProcessDied (503) and the process is
  started again.
  """

  def __init__(self, predict=None, *, window: float = 0.0,
               max_rows: int = 64, observe=None,
               processes: Sequence[model_process.ModelProcess] = ()):
    self._predict, self._window, self._max = predict, window, max_rows
    self._observe = observe or (lambda rows: None)
    if processes:
      self._idle = [process.predict for process in processes]
    else:
      pool = concurrent.futures.ThreadPoolExecutor(
          1, thread_name_prefix='mlpipe-score')

      async def on_thread(rows):
        return await asyncio.get_running_loop().run_in_executor(
            pool, self._predict, rows)
      self._idle = [on_thread]
    self._released: Optional[Tuple[Any, asyncio.Event]] = None
    self._pending: List[Tuple[Dict[str, Any], asyncio.Future]] = []
    self._task: Optional[asyncio.Task] = None
    self._scoring: Set[asyncio.Task] = set()

  async def score(self, row: Dict[str, Any]) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._pending.append((row, future))
    # One draining task at a time; it ends when nothing waits (so a test
    # client's short-lived event loops leave no task behind).
    if self._task is None or self._task.done():
      self._task = loop.create_task(self._drain())
    return await future

  async def _drain(self):
    loop = asyncio.get_running_loop()
    while self._pending:
      # The next batch is what waits once a scorer is free.
      while not self._idle:
        # One event per loop (a test client runs one loop per request).
        if self._released is None or self._released[0] is not loop:
          self._released = (loop, asyncio.Event())
        self._released[1].clear()
        await self._released[1].wait()
      score = self._idle.pop()
      if self._window:
        await asyncio.sleep(self._window)
      batch = self._pending[:self._max]
      del self._pending[:len(batch)]
      self._observe(len(batch))
      task = loop.create_task(self._score(score, batch))
      self._scoring.add(task)
      task.add_done_callback(self._scoring.discard)

  async def _score(self, score, batch):
    rows = [row for row, _ in batch]
    try:
      try:
        answers = await score(rows)
      except model_process.ModelProcessDied as e:
        answers = [_Failed(e)] * len(rows)
      except Exception:  # pylint: disable=broad-except
        # One bad row must not fail its neighbours: score each alone, so
        # only the requests whose own call fails get its error.
        answers = [await self._alone(score, row) for row in rows]
    finally:
      self._idle.append(score)
      if self._released is not None:
        self._released[1].set()
    for (_, future), answer in zip(batch, answers):
      if future.done():
        continue
      if isinstance(answer, _Failed):
        future.set_exception(answer.error)
      else:
        future.set_result(answer)

  @staticmethod
  async def _alone(score, row):
    try:
      return (await score([row]))[0]
    except Exception as e:  # pylint: disable=broad-except
      return _Failed(e)


@dataclasses.dataclass(frozen=True)
class _Failed:
  """A row whose own call failed (kept apart from answers, which may be
  anything `predict` returns)."""
  error: Exception
