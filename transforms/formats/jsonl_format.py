"""JSON lines (.jsonl, .json, .ndjson): one JSON object per line, decoded
by pyarrow's JSON reader with the declared types (timestamps as their RFC
3339 text). A line the block decoder refuses is checked alone: a JSON
object it could not type is UNDECODED (the parser decodes it from its
text), anything else is malformed."""

import collections
import io
import json
from typing import Dict, Iterator, Optional

import pyarrow as pa

from schemas.dataset import Dataset
from transforms.formats.lines import Lines, line_batches, split_lines
from transforms.formats.text import TextFormat

_ARROW_TYPES = {'string': pa.string(), 'float': pa.float64(),
                'int': pa.int64(), 'timestamp': pa.string()}


def json_schema(dataset: Dataset) -> pa.Schema:
  """What pyarrow's JSON reader decodes: the declared fields, timestamps as
  their RFC 3339 text."""
  return pa.schema([(n, _ARROW_TYPES[f.type])
                    for n, f in dataset.fields.items()])


def _json_block(data: bytes, rows: int, schema: pa.Schema) -> pa.Table:
  import pyarrow.json as pj  # pylint: disable=g-import-not-at-top
  table = pj.read_json(
      io.BytesIO(data),
      read_options=pj.ReadOptions(use_threads=False,
                                  block_size=max(len(data), 1 << 20)),
      parse_options=pj.ParseOptions(explicit_schema=schema,
                                    unexpected_field_behavior='ignore'))
  if table.num_rows != rows:
    raise ValueError('a line holds more or less than one JSON object')
  return table.select(schema.names)


def _unique_keys(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f'key {repeated[0]!r} appears more than once')
  return dict(pairs)


def line_problem(line: str) -> Optional[str]:
  """Why one line is not a JSON object, or None. A key given twice is a
  problem: which value was meant cannot be known."""
  try:
    values = json.loads(line, object_pairs_hook=_unique_keys)
  except ValueError as e:
    return f'not valid JSON: {e}'
  except RecursionError:
    return 'not valid JSON: nested too deeply'
  if not isinstance(values, dict):
    return 'a JSON line must be an object'
  return None


def _line_values(problem):
  # A line the block decoder refused: a JSON object is decoded from its
  # text by the parser (UNDECODED); anything else is malformed.
  return None, problem, problem is None


class JsonLines(TextFormat):
  """One JSON object per line."""

  name = 'jsonl'
  extensions = ('.jsonl', '.json', '.ndjson')

  def record_end(self, data: bytes) -> int:
    return data.rfind(b'\n') + 1

  def records(self, data: bytes) -> Lines:
    return split_lines(data)

  def column_types(self, path: str) -> Optional[Dict[str, str]]:
    """The keys of the objects in the file's first block, in the order
    they first appear, each with the type most of its JSON values have
    there (numbers: int, or float when any is not an int; else string): a
    record holding a value of another type is decoded alone, from its
    text, as the reader does with any such record."""
    counts: Dict[str, collections.Counter] = {}
    for _, lines in self.blocks(path):
      for i in range(len(lines)):
        try:
          values = json.loads(lines.line(i))
        except (ValueError, RecursionError):
          continue
        if isinstance(values, dict):
          for key, value in values.items():
            kind = (None if value is None else 'string' if isinstance(
                value, str) else 'int' if type(value) is int else  # noqa
                    'float' if isinstance(value, float) else 'other')
            counts.setdefault(key, collections.Counter())[kind] += 1
      break
    out = {}
    for key, seen in counts.items():
      numbers = seen['int'] + seen['float']
      out[key] = ('string' if seen['string'] >= numbers else
                  'float' if seen['float'] else 'int')
    return out

  def batches(self, path: str, start: int, end: Optional[int],
              dataset: Dataset) -> Iterator[pa.RecordBatch]:
    schema = json_schema(dataset)
    for before, lines in self.blocks(path, start, end):
      yield from decode_lines(lines, path, before, schema)


def decode_lines(lines: Lines, source: str, first_position: int,
                 schema: pa.Schema) -> Iterator[pa.RecordBatch]:
  """JSON lines (a file's block, or a batch of stream messages one per
  line) -> raw batches: pyarrow's JSON reader decodes the block at once,
  and a line it refuses is decoded alone."""
  return line_batches(lines, 0, schema, source, first_position,
                      lambda data, rows: _json_block(data, rows, schema),
                      line_problem, _line_values)
