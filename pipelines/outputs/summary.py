"""The run summary: counts from Beam metrics, and how they are printed."""

from typing import Dict, List

from apache_beam.metrics.metric import MetricsFilter

from transforms.parse import ERROR_KINDS, NAMESPACE


def counters(result) -> Dict[str, int]:
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


_BY_SOURCE = 'records_read_from.'


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
      # What each --input gave (transforms.read.ReadRecords).
      'records_read_by_source': {
          k[len(_BY_SOURCE):]: v for k, v in sorted(counts.items())
          if k.startswith(_BY_SOURCE)},
  }


def ingest_lines(summary: Dict[str, object]) -> List[str]:
  """The first lines of every entry point's closing summary."""
  kinds = summary['dead_letter_by_kind']
  sources = summary.get('records_read_by_source') or {}
  return [
      '',
      f'Records read:          {summary["records_read"]}' + (
          '  (' + ', '.join(f'{n} from {s}' for s, n in sources.items()) +
          ')' if sources else ''),
      f'  valid:               {summary["records_valid"]}',
      f'  dead-lettered:       {summary["records_dead_lettered"]}' + (
          '  (' + ', '.join(f'{k}: {v}' for k, v in kinds.items()) + ')'
          if kinds else ''),
  ]


def aggregate_lines(aggregate_rows: Dict[str, int]) -> List[str]:
  """The summary's aggregate-table line: rows per table, in declaration
  order; no line at all for a declaration without aggregates."""
  if not aggregate_rows:
    return []
  return ['Aggregate rows:        ' + ', '.join(
      f'{k}: {v}' for k, v in aggregate_rows.items())]
