"""runners/state_weights.py: the worker's state cache weighs values as
Beam does, with the module-globals exclusion taken once."""

import numpy as np
import pyarrow as pa
from apache_beam.runners.worker import statecache

from runners import state_weights


def _values():
  table = pa.table({'id': [f'tx{i:09d}' for i in range(5000)],
                    't': np.arange(5000)})
  return [[table], table.to_batches(), list(range(1000)), [1796635343000],
          [{'a': [1.5, 'x'], 'b': (None, b'yz')}], ['text'] * 30]


def test_weights_equal_beams_own():
  weigh = state_weights.cached_exclusion_size()
  for value in _values():
    assert weigh(value) == statecache.get_deep_size(value) > 0
    assert weigh(value) == weigh(value)  # the exclusion set is not consumed


def test_install_makes_the_cache_use_it(monkeypatch):
  monkeypatch.setattr(statecache, 'get_deep_size', statecache.get_deep_size)
  beam_weight = statecache.get_deep_size(_values()[0])
  state_weights.install()
  assert statecache.get_deep_size is not state_weights._beam_get_deep_size  # pylint: disable=protected-access
  cache = statecache.StateCache(10 << 20)
  cache.put('key', _values()[0])
  assert cache.describe_stats()  # the cache works with the new weights
  assert statecache.get_deep_size(_values()[0]) == beam_weight
