"""Following a registry's champion without a restart."""

import sys
import threading
from typing import Optional

from pipelines.base.errors import UsageError
from pipelines.model.registry import Registry, RegistryError
from pipelines.serving.loading import freeze_heap, load_model
from pipelines.serving.scorer import Scorer
from transforms.inference import ModelIntegrityError


class ChampionFollower:
  """Follows a registry's champion without a restart: `check` reads the
  registry's index (written whole and renamed, so never half of one) and,
  when its champion is not the version served, loads that model with the
  verified loader (hashes, signature, skops: nothing in the folder runs)
  and swaps it in. A champion that cannot be read or fails verification
  leaves the current model serving; the reason is kept (`error`), said
  once on stderr, and the next poll tries again. `start` polls every
  `seconds` on a daemon thread until `stop`."""

  def __init__(self, scorer: Scorer, registry: str, seconds: float):
    self.scorer, self.registry, self.seconds = scorer, registry, seconds
    self.swaps, self.failures, self.error = 0, 0, None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def check(self) -> Optional[str]:
    """One poll: the version now served if it changed, else None."""
    try:
      registry = Registry(self.registry)
      champion = registry.champion()
      if champion is None or champion['version'] == self.scorer.version:
        self.error = None
        return None
      model = load_model(registry.champion_dir())
      if model.metadata['model_version'] != champion['version']:
        raise ModelIntegrityError(
            f'{registry.champion_dir()} holds model '
            f'{model.metadata["model_version"]}, the index says '
            f'{champion["version"]}')
      self.scorer.swap(model)
    except (RegistryError, ModelIntegrityError, UsageError, OSError,
            ValueError, KeyError) as e:
      self.failures += 1
      message = f'champion not loaded, still serving {self.scorer.version}:' \
                f' {e}'
      if message != self.error:
        print(f'warning: {message}', file=sys.stderr, flush=True)
      self.error = message
      return None
    self.swaps += 1
    self.error = None
    print(f'Serving model {self.scorer.version} (the champion of '
          f'{self.registry})', file=sys.stderr, flush=True)
    freeze_heap()
    return self.scorer.version

  def start(self):
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='mlpipe-champion')
    self._thread.start()

  def _run(self):
    while not self._stop.wait(self.seconds):
      self.check()

  def stop(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
