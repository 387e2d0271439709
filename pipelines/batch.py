"""The batch pipeline: raw events -> features -> validation -> model -> predictions.

    python -m pipelines.batch --runner DirectRunner

with no other flags runs every stage on the committed sample. Stages:
  1. ingest + features (one Beam job): read, parse and validate, dead-letter,
     history features, windowed aggregates, TFDV statistics;
  2. validation (driver): anomalies against the schema, drift, HTML report,
     and the gate that stops a run whose data is broken;
  3-5. transform, train, predict (see pipelines.model_stages).
"""

import sys
from typing import Dict, List, Optional

import pipelines.quiet  # noqa: F401  (first: silences TensorFlow)

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import io
from pipelines.options import MlPipeOptions
from schemas.dataset import Dataset, SchemaError, load_dataset, parse_duration
from transforms.aggregates import EntityAggregates
from transforms.history import HistoryFeatures
from transforms.parse import (DEAD_LETTER, ERROR_KINDS, NAMESPACE, VALID,
                              ParseAndValidate, rfc3339_to_micros)
from transforms.read import InputError, ReadRecords, check_input

# Folders of --output_dir, one per output.
SILVER, DEAD, FEATURES, AGGREGATES, STATISTICS = (
    'silver', 'dead_letter', 'features', 'aggregates', 'statistics')


def _window(options: MlPipeOptions, dataset: Dataset):
  size = parse_duration(options.window_size or
                        dataset.aggregates.get('window_size', '24h'))
  period = parse_duration(options.window_period or
                          dataset.aggregates.get('window_period', size))
  if period > size or size % period:
    raise SchemaError(f'--window_period {period}s must divide '
                      f'--window_size {size}s')
  return size, period


def _reference_micros(options: MlPipeOptions) -> Optional[int]:
  if not options.reference_time:
    return None
  try:
    return rfc3339_to_micros(options.reference_time)
  except ValueError as e:
    raise InputError(f'--reference_time: {e}') from None


def build_pipeline(p: beam.Pipeline, options: PipelineOptions,
                   dataset: Optional[Dataset] = None) -> Dict[str, object]:
  """Ingest + features: returns the PCollections that tests check."""
  opts = options.view_as(MlPipeOptions)
  dataset = dataset or load_dataset(opts.schema)
  out = opts.output_dir
  size, period = _window(opts, dataset)

  raw = p | 'ReadRecords' >> ReadRecords(opts.input, opts.input_format)
  parsed = raw | 'ParseAndValidate' >> ParseAndValidate(
      dataset, _reference_micros(opts))
  valid, dead = parsed[VALID], parsed[DEAD_LETTER]
  features = valid | 'HistoryFeatures' >> HistoryFeatures(dataset)

  valid | 'WriteSilver' >> beam.io.WriteToParquet(
      io.join(out, SILVER, dataset.name), dataset.arrow_schema(),
      file_name_suffix='.parquet')
  dead | 'WriteDeadLetters' >> io.WriteJsonLines(
      io.join(out, DEAD, 'dead_letter'))
  features | 'WriteFeatures' >> beam.io.WriteToParquet(
      io.join(out, FEATURES, dataset.name),
      dataset.arrow_schema(dataset.feature_types()),
      file_name_suffix='.parquet')

  aggregates = {}
  for key in dataset.aggregates.get('keys', [dataset.entity_field]):
    rows = valid | f'Aggregate[{key}]' >> EntityAggregates(
        dataset, key, size, period)
    rows | f'WriteAggregates[{key}]' >> beam.io.WriteToParquet(
        io.join(out, AGGREGATES, key, key), _aggregate_schema(key),
        file_name_suffix='.parquet')
    aggregates[key] = rows

  return {'raw': raw, VALID: valid, DEAD_LETTER: dead, 'features': features,
          'aggregates': aggregates}


def _aggregate_schema(key: str):
  import pyarrow as pa
  return pa.schema([(key, pa.string()), ('window_start', pa.string()),
                    ('window_end', pa.string()), ('count', pa.int64()),
                    ('total_amount', pa.float64()),
                    ('mean_amount', pa.float64()),
                    ('fraud_rate', pa.float64())])


def _counters(result) -> Dict[str, int]:
  """Our Beam counters by name (committed values where the runner has them)."""
  counts = {}
  query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
  for counter in query['counters']:
    value = counter.committed
    if value is None:
      value = counter.attempted
    counts[counter.key.metric.name] = (
        counts.get(counter.key.metric.name, 0) + value)
  return counts


def ingest_summary(counts: Dict[str, int]) -> Dict[str, object]:
  read = counts.get('records_read', 0)
  valid = counts.get('records_valid', 0)
  dead = counts.get('records_dead_lettered', 0)
  return {
      'records_read': read,
      'records_valid': valid,
      'records_dead_lettered': dead,
      'dead_letter_by_kind': {k: counts[f'dead_letter.{k}']
                              for k in ERROR_KINDS
                              if counts.get(f'dead_letter.{k}')},
      'records_accounted_for': read == valid + dead,
  }


def _stage(number: int, total: int, text: str):
  print(f'[{number}/{total}] {text}', file=sys.stderr, flush=True)


def run(argv: Optional[List[str]] = None):
  """Runs the batch flow; returns the run summary (a dict)."""
  options = PipelineOptions(argv)
  opts = options.view_as(MlPipeOptions)
  dataset = load_dataset(opts.schema)
  _window(opts, dataset)
  _reference_micros(opts)
  paths = check_input(opts.input, opts.input_format)
  for folder in (SILVER, DEAD, FEATURES, AGGREGATES, STATISTICS):
    io.clear(io.join(opts.output_dir, folder))

  _stage(1, 1, f'Ingest and features: {len(paths)} file(s) from '
         f'{opts.input}')
  p = beam.Pipeline(options=options)
  build_pipeline(p, options, dataset)
  result = p.run()
  result.wait_until_finish()

  summary = ingest_summary(_counters(result))
  summary['outputs'] = {
      name: io.join(opts.output_dir, name)
      for name in (SILVER, DEAD, FEATURES, AGGREGATES)}
  io.write_json(io.join(opts.output_dir, 'run_summary.json'), summary)
  _print_summary(summary, opts.output_dir)
  return summary


def _print_summary(summary, output_dir):
  lines = [
      '',
      f'Records read:          {summary["records_read"]}',
      f'  valid:               {summary["records_valid"]}',
      f'  dead-lettered:       {summary["records_dead_lettered"]}' + (
          '  (' + ', '.join(f'{k}: {v}' for k, v in
                            summary['dead_letter_by_kind'].items()) + ')'
          if summary['dead_letter_by_kind'] else ''),
      'Outputs:',
  ]
  lines += [f'  {name:<20} {path}' for name, path in
            summary['outputs'].items()]
  lines.append(f'  {"run summary":<20} '
               f'{io.join(output_dir, "run_summary.json")}')
  print('\n'.join(lines), flush=True)


def main(argv: Optional[List[str]] = None) -> int:
  """Command-line entry: a clear one-line error and exit 2 on bad input."""
  try:
    run(argv)
  except (InputError, SchemaError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
