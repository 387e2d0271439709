"""Cheaper weights for the Python SDK worker's state cache.

The worker caches user state (our dedupe, history and lateness state, read
and written once per batch) and weighs every value it puts in the cache
with `objsize.get_deep_size`, which first walks the globals of every
loaded module to exclude them: ~0.5-1.5 ms per put whatever the value,
13.7 % of the workers' busy time in a Kafka -> Flink profile
(bench/RESULTS.md). `install()` makes the worker weigh with the same
function and settings but that exclusion set taken once, when the worker
starts: the same weights (modules loaded later are not excluded, so a
value holding one would weigh more and leave the cache sooner; nothing is
ever wrong, the weight only orders eviction), 10-50 times faster.
runners/worker_pool.py installs it in each worker it starts.
"""

import sys

import objsize
from apache_beam.runners.worker import statecache

_beam_get_deep_size = statecache.get_deep_size


def cached_exclusion_size():
  """A get_deep_size with Beam's settings and the module-globals exclusion
  computed now, once."""
  # The globals of every module, as objsize excludes them, held here: a
  # module dropped from sys.modules later must not free its dict, whose id
  # a new value could then take (and be excluded, weighing nothing).
  module_globals = []
  for module in list(sys.modules.values()):
    try:
      module_globals.append(vars(module))
    except TypeError:
      pass
  excluded = {id(None), *map(id, module_globals)}

  def get_deep_size(*objs) -> int:
    assert module_globals  # kept alive with this function
    # A copy: the traversal adds to the set it is given.
    return objsize.get_deep_size(
        *objs, exclude_set=set(excluded),
        get_size_func=statecache._size_func,  # pylint: disable=protected-access
        get_referents_func=statecache._get_referents_func,  # pylint: disable=protected-access
        filter_func=statecache._filter_func,  # pylint: disable=protected-access
        exclude_modules_globals=False)
  return get_deep_size


def install():
  """Makes this process's state cache weigh with cached_exclusion_size."""
  statecache.get_deep_size = cached_exclusion_size()
