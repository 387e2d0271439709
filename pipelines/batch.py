"""The batch pipeline: raw events -> features -> validation -> model -> predictions.

    python -m pipelines.batch --runner DirectRunner

with no other flags runs every stage on the committed sample. Stages:
  1. ingest + features (one Beam job): read, parse and validate, dead-letter,
     history features, windowed aggregates, TFDV statistics;
  2. validation (driver): anomalies against the schema, drift, HTML report,
     and the gate that stops a run whose data is broken;
  3-5. transform, train, predict (see pipelines.model.stages).
"""

import logging
import os
import sys
import time
import traceback
from typing import Dict, List, Optional

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli.shell import run_command
from pipelines.base.errors import RunError
from pipelines.model import stages as model_stages
from pipelines.validation import checks as validation
from pipelines.outputs import files
from pipelines.cli import preflight
from pipelines.cli.job_server import (keep_workers_between_stages,
                                      shared_job_server)
from pipelines.reporting import report as run_report
from pipelines.runs import record as run_record
from pipelines.runs import run_history
from pipelines.outputs import summary as summary_lib
from pipelines.model.registry import Registry, RegistryError
from pipelines.cli.options import (BatchOptions, aggregate_window, flags,
                               print_help, reference_micros)
from schemas.dataset import Dataset, SchemaError, load_dataset
from transforms.aggregates import EntityAggregates
from transforms.history_features import HistoryFeatures
from transforms.examples import TrainingExamples, examples_types
from transforms.side_tables import (JoinSideTables, load_side_table,
                                    load_side_tables, side_table_paths)
from transforms.common import (DEAD_LETTER, VALID, CountRows,
                               micros_to_rfc3339)
from transforms.parse import ParseAndValidate
from transforms.inference import ModelIntegrityError, verify_model_dir
from pipelines.serving import materialise
from transforms import online_store
from transforms.read import InputError, ReadRecords, check_input
from transforms import postgres_read, postgres_sink
from transforms.postgres import is_postgres
from transforms.sinks import WriteJsonLines, WriteParquet
from transforms.statistics import (STATS_FILE, GenerateFeatureStatistics,
                                   WriteStatistics, read_statistics)

SUMMARY_FILE = 'run_summary.json'
# Model metrics copied into the run summary (those the task has).
SUMMARY_METRICS = ('roc_auc', 'pr_auc', 'precision', 'recall', 'log_loss',
                   'accuracy', 'rmse', 'mae', 'r2')


class RunFailed(RunError, RuntimeError):
  """A stage failed after the run started (exit code 3)."""


# Folders of --output_dir, one per output.
SILVER, DEAD, FEATURES, AGGREGATES, STATISTICS, VALIDATION, TRAINING = (
    'silver', 'dead_letter', 'features', 'aggregates', 'statistics',
    'validation', 'training')


def build_pipeline(p: beam.Pipeline, options: PipelineOptions,
                   dataset: Optional[Dataset] = None) -> Dict[str, object]:
  """Ingest + features: returns the PCollections that tests check.

  Every element is a pyarrow.RecordBatch: raw batches from the reader, then
  valid records, dead-letter rows, feature rows and aggregate rows.
  """
  opts = flags(options, BatchOptions)
  shards = opts.shards
  dataset = dataset or load_dataset(opts.schema)
  out = opts.output_dir
  size, period = aggregate_window(opts, dataset)

  raw = p | 'ReadRecords' >> ReadRecords(
      postgres_read.input_url(opts.input, opts.input_query, opts.input_db),
      dataset, opts.input_format)
  parsed = raw | 'ParseAndValidate' >> ParseAndValidate(
      dataset, reference_micros(opts), shards, opts.input_format)
  valid, dead = parsed[VALID], parsed[DEAD_LETTER]
  tables = load_side_tables(dataset, side_table_paths(opts, dataset))
  features = valid
  if tables:
    features = features | 'JoinSideTables' >> JoinSideTables(dataset, tables)
  if dataset.histories:
    features = features | 'HistoryFeatures' >> HistoryFeatures(dataset,
                                                                shards)
  features = features | 'CountFeatureRows' >> beam.ParDo(
      CountRows('feature_rows'))

  valid | 'WriteSilver' >> WriteParquet(
      files.join(out, SILVER, dataset.name), dataset.arrow_schema())
  dead | 'WriteDeadLetters' >> WriteJsonLines(
      files.join(out, DEAD, 'dead_letter'))
  features | 'WriteFeatures' >> WriteParquet(
      files.join(out, FEATURES, dataset.name),
      dataset.arrow_schema(dataset.feature_types()))
  if opts.sink:
    for name, rows in ((postgres_sink.FEATURES, features),
                       (postgres_sink.DEAD_LETTERS, dead)):
      rows | f'WriteToPostgres[{name}]' >> postgres_sink.WriteToPostgres(
          opts.sink, dataset, name, run_id(opts), shards)

  examples = None
  if dataset.negatives:
    examples = features | 'TrainingExamples' >> TrainingExamples(
        dataset, tables, shards)
    examples | 'WriteTrainingExamples' >> WriteParquet(
        files.join(out, TRAINING, dataset.name),
        dataset.arrow_schema(examples_types(dataset)))

  stats = (features
           | 'FeatureStatistics' >> GenerateFeatureStatistics(dataset))
  stats | 'WriteStatistics' >> WriteStatistics(
      files.join(out, STATISTICS, STATS_FILE))

  aggregates = {}
  for key in dataset.aggregate_keys:
    rows = (valid
            | f'Aggregate[{key}]' >> EntityAggregates(
                dataset, key, size, period)
            | f'CountAggregates[{key}]' >> beam.ParDo(
                CountRows(f'aggregate_rows.{key}')))
    rows | f'WriteAggregates[{key}]' >> WriteParquet(
        files.join(out, AGGREGATES, key, key), dataset.aggregate_schema(key))
    aggregates[key] = rows

  return {'raw': raw, VALID: valid, DEAD_LETTER: dead, 'features': features,
          'aggregates': aggregates, 'statistics': stats,
          'training_examples': examples}


class _Stages:
  """Prints each stage as it starts and how long the previous one took."""

  def __init__(self):
    self._name, self._start = None, None
    self.seconds = {}   # stage name (its text before ':') -> seconds

  def __call__(self, text: Optional[str]):
    now = time.monotonic()
    if self._name:
      print(f'   done in {now - self._start:.1f} s', file=sys.stderr,
            flush=True)
      self.seconds[self._name.split(':')[0]] = round(now - self._start, 3)
    self._name, self._start = text, now
    if text:
      print(f'== {text}', file=sys.stderr, flush=True)


def _run_beam(p: beam.Pipeline) -> Dict[str, int]:
  result = p.run()
  result.wait_until_finish()
  return summary_lib.counters(result)


def _publish(summary, opts):
  """The end of a run that ended ok or was stopped by the gate: the final
  summary and metrics.prom, the run's line of the history and
  --retain_runs (pipelines.runs), then the report, which shows that
  history; prints where each went, the report's path last."""
  out = opts.output_dir
  history_path = opts.history or run_history.default_path(out)
  summary.setdefault('dataset', load_dataset(opts.schema).name)
  lines = run_report.finish_summary(summary, out, history_path)
  lines += run_record.record(history_path, summary, out, opts.retain_runs,
                             [opts.registry] if opts.registry else [])
  lines.append(f'Report:                '
               f'{run_report.write_report(out, summary, history_path)}')
  print('\n'.join(lines), flush=True)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
  """Runs the batch flow; returns the run summary (also run_summary.json)."""
  preflight.check_flags(argv)
  options = PipelineOptions(argv)
  files.use_pipeline_options(options)   # s3:// on the driver
  opts = flags(options, BatchOptions)
  preflight.check_runner(options)
  keep_workers_between_stages(options)
  dataset = load_dataset(opts.schema)
  aggregate_window(opts, dataset)
  reference_micros(opts)
  if preflight.is_dry_run(options):
    return _dry_run(options, dataset)
  preflight.check_services(options)
  preflight.check_object_stores(options, trains=bool(
      opts.train and not opts.model_dir and dataset.label is not None))
  if opts.online_store:
    online_store.preflight(opts.online_store)
  paths = check_input(
      postgres_read.input_url(opts.input, opts.input_query, opts.input_db),
      opts.input_format, dataset)
  if opts.sink:
    if not is_postgres(opts.sink):
      raise InputError(f'--sink {opts.sink}: give a postgresql:// URL')
    postgres_sink.check(opts.sink, dataset)
  for name, path in side_table_paths(opts, dataset).items():
    load_side_table(dataset, name, path)   # a bad table stops us here
  try:
    model_stages.model_types(opts.model_type, dataset.task)
  except ValueError as e:
    raise InputError(str(e)) from None
  out = opts.output_dir
  if opts.registry and not opts.model_dir and not opts.train:
    opts.model_dir = Registry(opts.registry).champion_dir()
  if not opts.train and not opts.model_dir:
    raise InputError('--no-train needs a model: --model_dir or --registry')
  scoring_only = bool(opts.model_dir)
  metadata, training_stats = None, None
  if scoring_only:
    metadata = verify_model_dir(opts.model_dir)
    training_stats = _training_statistics(metadata)
  baseline = _baseline(opts.baseline_stats)
  folders = [files.join(out, f) for f in (
      SILVER, DEAD, FEATURES, AGGREGATES, STATISTICS, VALIDATION, TRAINING,
      model_stages.TRANSFORM, model_stages.PREDICTIONS,
      model_stages.CANDIDATES, model_stages.MODEL)]
  if scoring_only and files.is_within(opts.model_dir, files.join(
      out, model_stages.MODEL)):
    folders.pop()   # scoring with this folder's own model: keep it
  files.check_output_dir(out, paths + [opts.model_dir, opts.baseline_stats],
                      folders)
  # From here on run_summary.json says how far the run got: 'running'
  # until it ends ok, is stopped by the gate or fails, and stays 'running'
  # if the process is killed.
  files.write_json(files.join(out, SUMMARY_FILE), {'status': 'running'})
  for folder in folders:
    files.clear(folder)
  if opts.sink:
    postgres_sink.prepare(opts.sink, dataset, run_id(opts))
  summary = {}
  try:
    # Flink: one job server for the run's Beam jobs, not one per job.
    with shared_job_server(options):
      _run_stages(options, opts, dataset, paths, summary, metadata,
                  training_stats, baseline)
    _publish(summary, opts)   # summary, metrics, history, report
    return summary
  except validation.DataValidationError:
    _publish(summary, opts)
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Any failure during the run: the summary and a log say so, the
    # command line gets one line (main), exit code 3.
    log = files.join(out, 'run.log')
    files.write_bytes(log, traceback.format_exc().encode('utf-8'))
    summary['status'] = 'failed'
    summary['error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
    summary['log'] = log
    files.write_json(files.join(out, SUMMARY_FILE), summary)
    raise RunFailed(f'the run failed: {summary["error"]} (details in '
                    f'{log})') from e


def _run_stages(options, opts, dataset, paths, summary, metadata,
                training_stats, baseline):
  """The five stages; fills `summary` as it goes (so a failure can still
  report what was done) and returns it."""
  out = opts.output_dir
  scoring_only = bool(opts.model_dir)
  features_glob = files.pattern_in(files.join(out, FEATURES), '*.parquet')
  _stage = _Stages()

  source = postgres_read.input_url(opts.input, opts.input_query,
                                   opts.input_db)
  _stage('Ingest and features: ' + (
      f'{len(paths)} file(s) from {opts.input}' if paths else
      postgres_read.source_of(source, dataset).name))
  p = beam.Pipeline(options=options)
  build_pipeline(p, options, dataset)
  counts = _run_beam(p)
  written = (SILVER, DEAD, FEATURES, AGGREGATES, STATISTICS) + (
      (TRAINING,) if dataset.negatives else ())
  for folder in written:
    files.mark_complete(files.join(out, folder))
  summary.update(summary_lib.ingest_summary(counts))
  sink_counts = dict(counts)
  if opts.sink:
    summary['sink'] = _sink_summary(opts, dataset, sink_counts)
  summary['feature_rows'] = counts.get('feature_rows', 0)
  summary['aggregate_rows'] = {
      k: counts.get(f'aggregate_rows.{k}', 0)
      for k in dataset.aggregate_keys}
  outputs = {name: files.join(out, name) for name in written}
  if dataset.negatives:
    summary['training_examples'] = {
        'positives': counts.get('training_positives', 0),
        'negatives': counts.get('training_negatives', 0),
        'negatives_short': counts.get('negatives_short', 0)}
  stats_path = files.join(out, STATISTICS, STATS_FILE)

  _stage('Validate: TFDV anomalies' + (', drift' if baseline else '') +
         (', training/serving skew' if training_stats else ''))
  outputs[VALIDATION] = files.join(out, VALIDATION)
  try:
    checked = validation.run(
        read_statistics(stats_path), dataset, files.join(out, VALIDATION),
        baseline_stats=baseline, training_stats=training_stats,
        fail_on_anomalies=opts.fail_on_anomalies,
        environment='SERVING' if scoring_only else 'TRAINING')
  except validation.DataValidationError as e:
    files.mark_complete(files.join(out, VALIDATION))
    summary['validation'] = _validation_summary(e.checked)
    summary['status'] = 'stopped: ERROR anomalies'
    _finish(summary, outputs, out, _stage)
    raise
  files.mark_complete(files.join(out, VALIDATION))
  summary['validation'] = _validation_summary(checked)

  if not scoring_only and dataset.label is None:
    print(f'No label declared in {dataset.name}: the run stops after '
          'statistics and validation (nothing to train or score).',
          file=sys.stderr, flush=True)
    summary['status'] = 'ok'
    summary['stopped_after'] = 'validation: no label declared'
    _finish(summary, outputs, out, _stage)
    return summary

  if scoring_only:
    model_dir = opts.model_dir
  else:
    _stage('Transform: tf.Transform analyse and transform')
    p = beam.Pipeline(options=options)
    model_stages.build_transform(
        p, dataset,
        files.pattern_in(files.join(out, TRAINING), '*.parquet')
        if dataset.negatives
        else features_glob, out, label_learned=bool(dataset.negatives))
    _run_beam(p)
    outputs['transform'] = files.join(out, model_stages.TRANSFORM)
    files.mark_complete(outputs['transform'])

    kinds = model_stages.model_types(opts.model_type, dataset.task)
    _stage(f'Train: scikit-learn {",".join(kinds)}')
    metadata = model_stages.train_stage(dataset, out, opts.model_type,
                                        stats_path)
    model_dir = files.join(out, model_stages.MODEL)
    outputs['model'] = model_dir
    # The model this run trained, whether or not it scores.
    summary['trained_model'] = _model_summary(metadata, model_dir, True)
    if opts.registry:
      summary['registry'] = _register(opts, model_dir, metadata)
      summary['trained_model']['registry_status'] = (
          summary['registry']['status'])
      champion = Registry(opts.registry).champion_dir()
      if summary['registry']['champion'] != metadata['model_version']:
        # The new model waits as a candidate; the champion scores.
        model_dir, metadata = champion, verify_model_dir(champion)

  _stage(f'Predict: RunInference with model {metadata["model_version"]}')
  p = beam.Pipeline(options=options)
  trained = summary.get('trained_model')
  predictions = model_stages.build_score(
      p, dataset, features_glob, model_dir, out, scored_at=_scored_at(opts),
      # This run's model scores the rows it was trained on: each
      # prediction says whether its row trained it, evaluated it, or
      # neither (split).
      mark_splits=bool(trained) and
      trained['version'] == metadata['model_version'])
  if opts.sink:
    predictions | 'WriteToPostgres' >> postgres_sink.WriteToPostgres(
        opts.sink, dataset, postgres_sink.PREDICTIONS, run_id(opts),
        opts.shards)
  counts = _run_beam(p)
  sink_counts.update(counts)
  outputs['predictions'] = files.join(out, model_stages.PREDICTIONS)
  files.mark_complete(outputs['predictions'])
  # The model that scored: this run's, or the registry's champion while
  # this run's waits as a candidate (then both are in the summary).
  summary['model'] = _model_summary(
      metadata, model_dir,
      bool(trained) and trained['version'] == metadata['model_version'])
  if opts.registry and 'registry' in summary:
    summary['model']['registry_status'] = (
        summary['registry']['status']
        if summary['model']['trained_in_this_run'] else 'champion')
  summary['predictions_written'] = counts.get('predictions_written', 0)
  summary['feature_rows_scored'] = counts.get('feature_rows_scored', 0)
  if opts.online_store:
    _stage('Materialise: entity states into the online store')
    summary['online_store'] = materialise.materialise(
        options, dataset, features_glob, opts.online_store,
        metadata['model_version'], opts.shards)

  if opts.sink:
    summary['sink'] = _sink_summary(opts, dataset, sink_counts)
  summary['status'] = 'ok'
  _finish(summary, outputs, out, _stage)
  return summary


def _model_summary(metadata, model_dir: str, trained_in_this_run: bool
                   ) -> Dict[str, object]:
  """What the run summary says of a model (the one trained in this run,
  the one that scored)."""
  model = {
      'version': metadata['model_version'],
      'dir': model_dir,
      'type': metadata['model_type'],
      'task': metadata.get('task', 'binary'),
      'threshold': metadata.get('threshold'),
      'threshold_from': (metadata.get('threshold_selection') or {}).get(
          'method'),
      'split': metadata.get('training', {}).get('split'),
      'metrics': {split: {k: m[k] for k in SUMMARY_METRICS if k in m}
                  for split, m in metadata['metrics'].items()},
      'trained_in_this_run': trained_in_this_run,
  }
  if metadata.get('compared'):
    model['compared'] = metadata['compared']
  return model


def run_id(opts) -> str:
  """--run_id, else the name of the run's folder (data/run1 -> run1)."""
  return opts.run_id or os.path.basename(opts.output_dir.rstrip('/'))


def _sink_summary(opts, dataset, counts) -> Dict[str, object]:
  """Where --sink wrote and how many rows went to each table."""
  return {'url': postgres_sink.display_url(opts.sink), 'run_id': run_id(opts),
          'rows': {t.name: counts.get(f'sink_rows.{t.name}', 0)
                   for t in postgres_sink.tables(dataset).values()}}


def _scored_at(opts) -> Optional[str]:
  """The run's reference time in RFC 3339: when its predictions were made
  (from the flag, not the clock, so reruns stay identical)."""
  if not opts.reference_time:
    return None
  return micros_to_rfc3339(reference_micros(opts))


def _register(opts, model_dir: str, metadata) -> Dict[str, object]:
  """Registers the run's model; returns what the summary says of it."""
  registry = Registry(opts.registry)
  times = metadata.get('training', {}).get('eval_time_range') or {}
  entry = registry.register(
      model_dir, f'trained by pipelines.batch on {opts.input}',
      at=opts.reference_time or times.get('max'))
  return {'root': opts.registry, 'registered': entry['version'],
          'status': entry['status'],
          'champion': registry.champion()['version']}


def _dry_run(options: PipelineOptions, dataset: Dataset):
  """Translates the ingest job without submitting it: no driver-side reads
  or writes, no metrics (a dry run has none). The transform job cannot be
  translated offline: tf.Transform writes to --temp_location through
  TensorFlow's own GCS client while the graph is built."""
  runner = preflight.runner_name(options)
  p = beam.Pipeline(options=options)
  build_pipeline(p, options, dataset)
  state = str(p.run().state)
  print(f'Dry run: ingest job translated for {runner}; nothing was '
        'submitted, read or written', flush=True)
  return {'status': 'dry run', 'runner': runner, 'jobs': {'ingest': state}}


def _finish(summary, outputs, out, stages):
  stages(None)
  summary['stage_seconds'] = stages.seconds
  summary['outputs'] = outputs
  files.write_json(files.join(out, SUMMARY_FILE), summary)
  _print_summary(summary, out)


def _baseline(path: Optional[str]):
  if not path:
    return None
  if not FileSystems.exists(path):
    raise InputError(f'--baseline_stats {path} does not exist')
  return read_statistics(path)


def _training_statistics(metadata):
  """The statistics the model was trained on (the baseline for skew),
  read before this run clears any output folder."""
  path = metadata.get('statistics_path')
  if not path or not FileSystems.exists(path):
    logging.warning('training statistics %s are gone: no skew check', path)
    return None
  return read_statistics(path)


def _validation_summary(checked):
  return {
      'anomalies': checked['counts'],
      'errors': sorted({a['feature'] for a in checked['anomalies']
                        if a['severity'] == validation.ERROR}),
      'drifted': checked['drift']['drifted'] if checked['drift'] else None,
      'drift': {n: f['value'] for n, f in
                checked['drift']['features'].items()}
               if checked['drift'] else None,
      'skewed': checked['skew']['drifted'] if checked['skew'] else None,
      'skew': {n: f['value'] for n, f in checked['skew']['features'].items()}
              if checked['skew'] else None,
  }


_METRIC_NAMES = {'roc_auc': 'ROC AUC', 'pr_auc': 'PR AUC',
                 'log_loss': 'log loss', 'accuracy': 'accuracy',
                 'rmse': 'RMSE', 'mae': 'MAE', 'r2': 'R2'}


def _model_line(model) -> str:
  """'<version> (<type> <task>, eval <metrics>)' of a model summary."""
  metrics = model['metrics'].get('eval', {})
  shown = ', '.join(f'{_METRIC_NAMES[k]} {metrics[k]:.3f}'
                    for k in SUMMARY_METRICS[:2] + SUMMARY_METRICS[4:]
                    if metrics.get(k) is not None)
  return (f'{model["version"]} ({model["type"]} {model["task"]}' +
          (f', eval {shown}' if shown else '') + ')')


def _print_summary(summary, output_dir):
  lines = summary_lib.ingest_lines(summary) + [
      f'Feature rows:          {summary["feature_rows"]}',
  ] + ([f'Training examples:     {summary["training_examples"]["positives"]} '
        f'positives, {summary["training_examples"]["negatives"]} sampled '
        'negatives'] if 'training_examples' in summary else []) + (
      summary_lib.aggregate_lines(summary['aggregate_rows']))
  checked = summary.get('validation')
  if checked:
    counts = checked['anomalies']
    lines.append('Anomalies:             ' + ', '.join(
        f'{k}: {v}' for k, v in counts.items()) + (
            f'  (ERROR in {", ".join(checked["errors"])})'
            if checked['errors'] else ''))
    for kind in ('drifted', 'skewed'):
      if checked[kind] is not None:
        lines.append(f'{kind.capitalize() + ":":<23}'
                     f'{", ".join(checked[kind]) or "none over threshold"}')
  sink = summary.get('sink')
  if sink:
    lines.append('PostgreSQL sink:       ' + ', '.join(
        f'{n} rows to {t}' for t, n in sink['rows'].items()) +
                 f' (run {sink["run_id"]}, {sink["url"]})')
  store = summary.get('online_store')
  if store:
    lines.append(f'Online store:          {store["entities_written"]} '
                 f'entities written, {store["writes_failed"]} failed '
                 f'({store["retries"]} retries) to {store["url"]}')
  if summary.get('status', 'ok') != 'ok':
    lines.append(f'Run {summary["status"]}: nothing downstream of '
                 'validation was written')
  model = summary.get('model')
  if model:
    trained = summary.get('trained_model')
    if trained and trained['version'] != model['version']:
      lines.append(f'Trained model:         {_model_line(trained)}, '
                   f'{trained.get("registry_status", "not registered")}; '
                   'it did not score')
    lines.append(f'Model:                 {_model_line(model)}')
    lines.append(f'Predictions written:   {summary["predictions_written"]}')
    registry = summary.get('registry')
    if registry:
      lines.append(f'Registry:              {registry["registered"]} '
                   f'registered as {registry["status"]}; champion '
                   f'{registry["champion"]} scored')
  lines.append('Outputs:')
  lines += [f'  {name:<14} {path}' for name, path in
            summary['outputs'].items()]
  lines.append(f'  {"summary":<14} {files.join(output_dir, SUMMARY_FILE)}')
  print('\n'.join(lines), flush=True)


def main(argv: Optional[List[str]] = None) -> int:
  """Command-line entry: a clear one-line error and exit 2 on bad input."""
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    print_help('python -m pipelines.batch', BatchOptions)
    return 0
  # run() turns any failure during the run into RunFailed (exit 3, the
  # traceback in run.log); the gate is exit 1, bad usage exit 2.
  return run_command(lambda: run(argv) and None)


if __name__ == '__main__':
  sys.exit(main())
