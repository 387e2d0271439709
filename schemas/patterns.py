"""Declared `pattern`s: one engine, RE2, for every path that checks one.

A field's pattern is matched from the start of the value (as `re.match`
did) by RE2, the engine of `pyarrow.compute.match_substring_regex`, on a
whole column (the batch path) and on one value (the per-record definition,
the stream, the scoring service) alike. So both paths say the same of every
value, and no value can make a check backtrack: RE2 runs in time linear in
the value, where Python's `re` takes exponential time on `^(a+)+$` and a
38-byte 'aaa...!'. RE2 has no look-around and no back-references; a
declaration that uses them is refused by `check`. Its `$` matches at the
very end of the value only (Python's also before a final newline).
"""

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def anchored(pattern: str) -> str:
  """The pattern as it is applied: anchored at the start of the value."""
  return f'^(?:{pattern})'


def check(pattern) -> Optional[str]:
  """None when RE2 runs `pattern`, else why not (one line)."""
  if not isinstance(pattern, str):
    return f'{pattern!r} is not a string'
  try:
    # Arrow compiles the expression only for a non-empty input.
    pc.match_substring_regex(pa.array([''], pa.string()), anchored(pattern))
  except pa.ArrowInvalid as e:
    why = ' '.join(str(e).split()).replace('Invalid regular expression: ',
                                           '')
    return (f'RE2 cannot run {pattern!r}: {why} (no look-around or '
            'back-references)')
  return None


def matches(values: pa.Array, pattern: str) -> np.ndarray:
  """Which rows of a string column match `pattern` (null rows do not)."""
  found = pc.match_substring_regex(values, anchored(pattern))
  return np.asarray(pc.fill_null(found, False).to_numpy(
      zero_copy_only=False), dtype=bool)


def match(value: str, pattern: str) -> bool:
  """Whether one value matches `pattern`: the same RE2 as `matches`. A
  value that is not text (a lone surrogate from a JSON escape) matches
  nothing, as no Arrow column can hold it."""
  try:
    scalar = pa.scalar(value, pa.string())
  except (UnicodeEncodeError, pa.ArrowException):
    return False
  return bool(pc.match_substring_regex(scalar, anchored(pattern)).as_py())
