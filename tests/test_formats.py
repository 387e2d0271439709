"""transforms.formats: one module per input format behind one interface, a
registry every format list comes from, and text read in bounded blocks (a
.gz that expands to a lot, a .gz cut short)."""

import gzip
import json
import os
import tracemalloc
import zlib

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli.options import RecordOptions
from pipelines.synthetic import transactions as generate
from schemas.dataset import load_dataset
from transforms import formats
from transforms.formats import text
from transforms.formats.lines import split_lines
from transforms.formats.raw import raw_batch
from transforms.parse import BatchValidator
from transforms.read import (ERROR, POSITION, InputError, read_file,
                             check_input, file_ranges, read_batches,
                             read_range, record_texts)

DATASET = load_dataset()
GOOD = {'transaction_id': 'tx000000001', 'user_id': 'u00001',
        'merchant_id': 'm00001', 'merchant_category': 'grocery',
        'amount': 12.5, 'currency': 'USD', 'channel': 'pos', 'country': 'US',
        'event_time': '2026-10-01T10:00:00Z', 'is_fraud': 0}


def _records(n):
  return [dict(GOOD, transaction_id=f'tx{i:09d}', amount=10.0 + i)
          for i in range(n)]


def _jsonl(records) -> bytes:
  return b''.join(json.dumps(r).encode() + b'\n' for r in records)


def _csv(records) -> bytes:
  lines = [','.join(GOOD)] + [','.join(str(r[k]) for k in GOOD)
                              for r in records]
  return ''.join(line + '\n' for line in lines).encode()


def _rows(batches):
  return [row for b in batches for row in b.to_pylist()]


def _validated(batches):
  """(valid transaction ids, dead (position, kind, field))."""
  validator, valid, dead = BatchValidator(DATASET), [], []
  for batch in batches:
    good, bad = validator.validate(batch)
    valid += good.column('transaction_id').to_pylist()
    dead += [(d['position'], d['error_kind'], d['field']) for d in bad]
  return valid, dead


# The registry ---------------------------------------------------------------
def test_every_format_list_comes_from_the_registry():
  assert formats.FORMATS == tuple(formats.REGISTRY) == (
      'jsonl', 'csv', 'avro', 'parquet')
  # The flag takes the registry's names and refuses others.
  assert RecordOptions(['--input_format', 'parquet']).view_as(
      RecordOptions).input_format == 'parquet'
  with pytest.raises(SystemExit):
    RecordOptions(['--input_format', 'xml']).view_as(RecordOptions)
  # The generator's text formats and the .gz it writes follow what each
  # format says it can do.
  assert generate.TEXT_FORMATS == formats.text_formats() == ('jsonl', 'csv')
  assert formats.compressible_formats() == ('jsonl', 'csv')
  with pytest.raises(generate.UsageError, match='compressed inside'):
    generate.output_format('x.parquet.gz')


class _Tsv(text.TextFormat):
  """A made-up format for the test: tab-separated id and amount."""
  name = 'tsv'
  extensions = ('.tsv',)

  def record_end(self, data):
    return data.rfind(b'\n') + 1

  def records(self, data):
    return split_lines(data)

  def batches(self, path, start, end, dataset):
    for before, lines in self.blocks(path, start, end):
      parts = [lines.line(i).split('\t') for i in range(len(lines))]
      values = pa.table({'transaction_id': [p[0] for p in parts],
                         'amount': [float(p[1]) for p in parts]})
      yield raw_batch(values, path, before, raw=lines.text.cast(pa.string()))


def test_a_new_format_is_one_class_registered(tmp_path, monkeypatch):
  """Nothing outside a format's module branches on its name: registering
  one makes preflight, ranges and reading take it."""
  path = tmp_path / 'x.tsv.gz'
  path.write_bytes(gzip.compress(b'a\t1.5\n\nb\t2\n'))
  with pytest.raises(InputError, match='cannot tell the format'):
    check_input(str(path))
  monkeypatch.setitem(formats.REGISTRY, 'tsv', _Tsv())
  assert check_input(str(path)) == [str(path)]
  rows = _rows(read_batches(str(path), DATASET))
  assert [(r['transaction_id'], r['amount'], r[POSITION]) for r in rows] == [
      ('a', 1.5, 0), ('b', 2.0, 1)]


# Bounded blocks -------------------------------------------------------------
def test_a_gz_of_blank_lines_is_read_in_bounded_memory(tmp_path):
  """#23.15: 200 records around 64 MB of blank lines, 64 KB compressed.
  Reading it took 32 MB per decompressed MB (2 GB here); blocks of 4 MB,
  split 256 KB at a time, keep the peak within a fixed budget, under the
  size the file expands to."""
  blank = gzip.compress(b'\n' * (1 << 20), compresslevel=9)
  records = _records(200)
  # gzip members one after another are one stream (RFC 1952).
  data = (gzip.compress(_jsonl(records[:100])) + blank * 32 +
          gzip.compress(_jsonl(records[100:150])) + blank * 32 +
          gzip.compress(_jsonl(records[150:])))
  path = tmp_path / 'blank.jsonl.gz'
  path.write_bytes(data)
  assert len(data) < 100_000
  tracemalloc.start()
  try:
    rows = _rows(read_batches(str(path), DATASET))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert [r['transaction_id'] for r in rows] == [
      r['transaction_id'] for r in records]
  assert all(r[ERROR] is None for r in rows)
  # About 16 MB: a 4 MB block, its copy, and 256 KB of blank lines split
  # at a time (~30 bytes per byte for a moment). The blocks and NumPy
  # arrays are traced; Arrow holds next to nothing of blank lines.
  assert peak < 48 << 20, f'reading peaked at {peak >> 20} MB'


# Breaks ---------------------------------------------------------------------
def _whole_lines_before_break(data: bytes) -> int:
  """Whole lines in what a cut gzip still decompresses to (zlib gives what
  it can without raising)."""
  return zlib.decompressobj(wbits=31).decompress(data).count(b'\n')


@pytest.mark.parametrize('fmt,header', [('jsonl', 0), ('csv', 1)])
def test_a_cut_gz_keeps_every_whole_record_before_the_break(tmp_path, fmt,
                                                            header):
  """#25.1: a .gz cut at 60 % of its bytes: the whole records before the
  break are valid, then one unreadable_file row at the record reached."""
  records = _records(3000)
  data = gzip.compress(_jsonl(records) if fmt == 'jsonl' else _csv(records))
  cut = data[:int(len(data) * 0.6)]
  path = tmp_path / f'cut.{fmt}.gz'
  path.write_bytes(cut)
  kept = _whole_lines_before_break(cut) - header
  assert 1000 < kept < 3000
  valid, dead = _validated(read_batches(str(path), DATASET))
  assert valid == [r['transaction_id'] for r in records[:kept]]
  assert dead == [(kept, 'unreadable_file', None)]


def test_a_cut_avro_keeps_the_records_before_the_break(tmp_path):
  records = _records(3000)
  path = tmp_path / 'cut.avro'
  with open(path, 'wb') as f:
    fastavro.writer(f, fastavro.parse_schema(DATASET.avro_schema()), records,
                    sync_interval=4000)
  path.write_bytes(path.read_bytes()[:int(os.path.getsize(path) * 0.6)])
  valid, dead = _validated(read_batches(str(path), DATASET))
  # Avro blocks of ~4 KB: all but the last ~25 records before the cut.
  assert 1700 < len(valid) <= 1800
  assert valid == [r['transaction_id'] for r in records[:len(valid)]]
  assert dead == [(len(valid), 'unreadable_file', None)]


# Avro unions ----------------------------------------------------------------
def test_an_avro_union_value_of_another_type_fails_only_its_record(tmp_path):
  """#23.16: `amount` a union of double and string, one value a string: that
  record is a type_error, the other 199 are valid."""
  schema = DATASET.avro_schema()
  for field in schema['fields']:
    if field['name'] == 'amount':
      field['type'] = ['null', 'double', 'string']
  records = _records(200)
  records[57]['amount'] = 'twelve'
  path = tmp_path / 'union.avro'
  with open(path, 'wb') as f:
    fastavro.writer(f, fastavro.parse_schema(schema), records)
  valid, dead = _validated(read_batches(str(path), DATASET))
  assert dead == [(57, 'type_error', 'amount')]
  assert valid == [r['transaction_id'] for i, r in enumerate(records)
                   if i != 57]
  # Its dead-letter text is the record's values, as read.
  texts = record_texts(str(path), DATASET, [57])
  assert json.loads(texts[57])['amount'] == 'twelve'


# Ranges and blocks give what a whole read gives ---------------------------------
@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_ranges_and_small_blocks_read_what_one_whole_read_does(
    tmp_path, monkeypatch, fmt):
  """A file split in 1 KB byte ranges and read in 300-byte blocks gives the
  rows a whole read gives: blank lines, a bad line, a BOM, a last line
  without a newline."""
  records = _records(40)
  body = _jsonl(records) if fmt == 'jsonl' else _csv(records)
  lines = body.split(b'\n')
  lines.insert(7, b'   ')
  lines.insert(20, b'not a record, at all')
  data = b'\xef\xbb\xbf' + b'\n'.join(lines).rstrip(b'\n')
  path = tmp_path / f'r.{fmt}'
  path.write_bytes(data)
  whole = _rows(read_batches(str(path), DATASET))
  monkeypatch.setattr(text, 'BLOCK_BYTES', 300)
  ranges = file_ranges(str(path), len(data), split_bytes=1024)
  assert len(ranges) >= 3
  split = _rows(b for r in ranges for b in read_range(r, DATASET))
  assert split == whole
  assert len(whole) == 41
  assert [r['__raw'] for r in whole if r[ERROR]] == ['not a record, at all']


def test_a_quoted_csv_field_across_a_block_boundary_is_one_record(
    tmp_path, monkeypatch):
  names = list(GOOD) + ['note']
  row = [str(GOOD[k]) for k in GOOD]
  note = '"' + 'a long note\n' * 30 + 'that ends, here"'
  data = (','.join(names) + '\n' + ','.join(row + [note]) + '\n' +
          ','.join(row[:1] + row[1:] + ['plain']) + '\n')
  path = tmp_path / 'notes.csv'
  path.write_text(data)
  monkeypatch.setattr(text, 'BLOCK_BYTES', 100)
  rows = _rows(read_batches(str(path), DATASET))
  assert [(r[POSITION], r[ERROR]) for r in rows] == [(0, None), (1, None)]
  assert rows[0]['__raw'].endswith('that ends, here"')


@pytest.mark.parametrize('split_bytes', [97, 200, 333, 1024])
def test_quoted_csv_fields_across_range_boundaries_read_as_whole(
    tmp_path, split_bytes):
  """Byte ranges of a CSV file whose quoted fields span lines (and cross
  the ranges' boundaries) give the rows, positions and raw texts a whole
  read gives: a range starts at a line end outside quotes and its last
  record goes on while its quotes are open."""
  names = list(GOOD) + ['note']
  lines = [','.join(names)]
  for i in range(30):
    row = [f'tx{i:09d}'] + [str(GOOD[k]) for k in list(GOOD)[1:]]
    note = ('"' + 'a long note\n' * 5 + 'ends, "" here"' if i % 7 == 3
            else 'plain')
    lines.append(','.join(row + [note]))
  lines.insert(9, '')   # a blank line between records: no record
  data = '\ufeff' + '\n'.join(lines) + '\n'
  path = tmp_path / 'notes.csv'
  path.write_text(data, encoding='utf-8')
  size = os.path.getsize(path)
  whole = _rows(read_batches(str(path), DATASET))
  assert [r[POSITION] for r in whole] == list(range(30))
  assert not any(r[ERROR] for r in whole)
  assert whole[3]['__raw'].endswith('ends, "" here"')
  ranges = file_ranges(str(path), size, split_bytes=split_bytes)
  assert len(ranges) >= 3
  assert _rows(b for r in ranges for b in read_range(r, DATASET)) == whole


def test_parquet_row_group_ranges_read_what_one_whole_read_does(tmp_path):
  records = _records(100)
  path = tmp_path / 'r.parquet'
  pq.write_table(pa.Table.from_pylist(records), path, row_group_size=10)
  whole = _rows(read_batches(str(path), DATASET))
  ranges = file_ranges(str(path), os.path.getsize(path), split_bytes=1000)
  assert len(ranges) > 2
  assert _rows(b for r in ranges for b in read_range(r, DATASET)) == whole
  assert [r[POSITION] for r in whole] == list(range(100))


def test_record_texts_of_a_gz_are_read_in_blocks(tmp_path, monkeypatch):
  records = _records(50)
  path = tmp_path / 'r.csv.gz'
  path.write_bytes(gzip.compress(_csv(records)))
  monkeypatch.setattr(text, 'BLOCK_BYTES', 200)
  texts = record_texts(str(path), DATASET, [0, 31, 49, 50])
  assert sorted(texts) == [0, 31, 49]
  assert texts[31].startswith('tx000000031,')


def test_thousands_of_refused_lines_are_each_their_own_record(tmp_path):
  # A column declared a string that holds numbers on 3,000 lines: pyarrow
  # refuses every block. Each line must be decoded alone (a record each),
  # never the whole block as one unreadable file (the recursive split went
  # over Python's recursion limit at ~1,000 refused lines).
  records = generate.generate_transactions(3000, seed=2)
  path = tmp_path / 'numbers.jsonl'
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(dict(r, merchant_id=7)) + '\n')
  raws = list(read_file(str(path), DATASET))
  assert len(raws) == len(records)
  assert not [r for r in raws if r.error and 'unreadable' in r.error]
  assert [r.position for r in raws] == list(range(len(records)))
