"""Our pipeline flags: one PipelineOptions subclass per entry point.

Every flag not declared here (--runner, --flink_master, --project, --region,
--temp_location, --direct_num_workers, ...) passes through to Beam and the
runner untouched, so one command line works on every runner.
"""

import argparse
import os
import types
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from schemas.dataset import Dataset, SchemaError, parse_duration
from transforms.parse import rfc3339_to_micros
from transforms.common import DEFAULT_SHARDS
from transforms.formats import FORMATS
from transforms.read import InputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEFAULT_INPUT = os.path.join(REPO_ROOT, 'data', 'sample', 'transactions.jsonl')
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, 'data', 'output')


class RecordOptions(PipelineOptions):
  """Flags of every entry point that reads records (batch and streaming):
  input, declaration, output, windows, reference time, model.

  Beam parses the flags of every PipelineOptions subclass in one parser,
  so a flag is declared in exactly one class: these here, the rest in
  BatchOptions or StreamingOptions."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--input', default=DEFAULT_INPUT,
        help='Glob of input files, local or gs:// (.jsonl, .csv, .avro, '
        '.parquet, optionally .gz), or (batch) a PostgreSQL table: '
        'postgresql://user@host:port/db?table=NAME[&key=COLUMN]. Default: '
        'the committed sample.')
    parser.add_argument(
        '--input_format', default=None,
        choices=FORMATS,
        help='Record format, when file extensions do not tell.')
    parser.add_argument(
        '--schema', default='transactions',
        help='Dataset declaration: a name in schemas/ or a path to a .yaml.')
    parser.add_argument(
        '--output_dir', default=DEFAULT_OUTPUT,
        help='Where every output of the run goes (local or gs://).')
    parser.add_argument(
        '--window_size', default=None,
        help='Entity aggregate window length, e.g. 24h (default: schema).')
    parser.add_argument(
        '--window_period', default=None,
        help='Sliding period, e.g. 1h; equal to the size means fixed '
        'windows (default: schema).')
    parser.add_argument(
        '--side_table', default=None, action='append',
        help='NAME=PATH: read the declared side table NAME (e.g. '
        'items=data/sample/items.csv) from PATH instead of the path in the '
        'declaration. Repeat for several tables.')
    parser.add_argument(
        '--reference_time', default=None,
        help='RFC 3339 "now" for the freshness check (default: none, so no '
        'record is stale and runs stay deterministic).')
    parser.add_argument(
        '--registry', default=None,
        help='Model registry folder (local or gs://, see pipelines.registry): '
        'a training run registers its model there (the first becomes the '
        'champion) and predictions come from the champion.')
    parser.add_argument(
        '--model_dir', default=None,
        help='Score with this existing model directory instead of '
        'training a new model.')
    parser.add_argument(
        '--online_store', default=None,
        help='redis://host:port/db: keep each entity\'s recent records and '
        'latest features there for the scoring service (pipelines.serve); '
        'batch writes the state as of the end of its input, streaming '
        'updates it per event.')


class BatchOptions(PipelineOptions):
  """Flags of pipelines.batch."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--fail_on_anomalies', default=True,
        action=argparse.BooleanOptionalAction,
        help='Stop the run when validation finds an ERROR anomaly '
        '(--no-fail_on_anomalies reports and continues).')
    parser.add_argument(
        '--baseline_stats', default=None,
        help='Statistics (stats.pb) to compare against for drift.')
    parser.add_argument(
        '--model_type', default='auto',
        help='Model trained by the train stage: auto (default: every type '
        'that fits the task, gbt and logreg for classes, gbt and linear for '
        'regression), gbt (any task), logreg (classes) or linear '
        '(regression); several, comma-separated (e.g. gbt,logreg), are '
        'trained on the same split and the best by the eval metric is '
        'kept, with the others\' metrics beside it.')
    parser.add_argument(
        '--train', default=True, action=argparse.BooleanOptionalAction,
        help='Train a model (default). --no-train with --registry scores '
        'with the registry\'s champion.')
    parser.add_argument(
        '--shards', default=DEFAULT_SHARDS, type=int,
        help='Shards of the keyed shuffles (duplicates by id, history by '
        'entity): each moves (shard, RecordBatch) pairs. The default suits '
        'one machine to a few dozen workers; raise it with the workers.')
    parser.add_argument(
        '--history', default=None,
        help='Run history (JSON lines) this run appends to (default: '
        'runs.jsonl beside --output_dir, in its parent folder).')
    parser.add_argument(
        '--input_query', default=None,
        help='Read the rows of this SQL query (with --input_db) instead of '
        '--input.')
    parser.add_argument(
        '--input_db', default=None,
        help='postgresql://user@host:port/db[?key=COLUMN] that '
        '--input_query runs on (the password from PGPASSWORD or ~/.pgpass).')
    parser.add_argument(
        '--sink', default=None,
        help='postgresql://user@host:port/db: also write the feature table, '
        'the predictions and the dead letters to <dataset>_features, '
        '_predictions and _dead_letter there, tagged with --run_id (a rerun '
        'replaces its own rows).')
    parser.add_argument(
        '--run_id', default=None,
        help='The run\'s id in --sink tables (default: the name of '
        '--output_dir\'s folder).')
    parser.add_argument(
        '--retain_runs', default=None, type=int,
        help='Keep the outputs of the latest N runs of the history and '
        'delete older ones (never a folder holding a registry or its '
        'champion). Default: keep everything.')


class StreamingOptions(PipelineOptions):
  """Flags of pipelines.streaming. Without --input_subscription or
  --input_topic, --input is replayed as a stream (transforms.read.ReplayFile)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--stream_shards', default=None, type=int,
        help='shards of the keyed steps (dedupe, histories, aggregates): '
        'each shard\'s state is read and written once per batch. Default: '
        '1 on the DirectRunner, 4 elsewhere; fewer make bigger batches, more '
        'spread the keys over more workers.')
    parser.add_argument(
        '--input_subscription', default=None,
        help='Pub/Sub subscription to read JSON records from '
        '(projects/<p>/subscriptions/<s>).')
    parser.add_argument(
        '--input_topic', default=None,
        help='Pub/Sub topic to read JSON records from (a temporary '
        'subscription is created; --input_subscription is preferred), or '
        'with --bootstrap_servers the Kafka topic.')
    parser.add_argument(
        '--bootstrap_servers', default=None,
        help='Kafka brokers (host:port,...): --input_topic, --output_topic '
        'and --dead_letter_topic then name Kafka topics, read and written '
        'by librdkafka in the Python workers (transforms.kafka; FlinkRunner).')
    parser.add_argument(
        '--max_num_records', default=None, type=int,
        help='Kafka: stop after this many records (a bounded run, for tests '
        'and benchmarks). Default: read until cancelled.')
    parser.add_argument(
        '--timestamp_attribute', default=None,
        help='Pub/Sub message attribute holding the event time, so the '
        'watermark follows event time instead of publish time.')
    parser.add_argument(
        '--output_topic', default=None,
        help='Pub/Sub (or with --bootstrap_servers Kafka) topic for '
        'predictions (feature rows without a model).')
    parser.add_argument(
        '--dead_letter_topic', default=None,
        help='Pub/Sub (or with --bootstrap_servers Kafka) topic for '
        'dead-letter rows (parse errors, duplicates, late events).')
    parser.add_argument(
        '--replay_speed', default=None, type=float,
        help='Replay: seconds of event time per second of the runner\'s '
        'processing-time clock (e.g. 3600 = an hour a second). Default: '
        'processing time stands still, so only watermark panes fire.')
    parser.add_argument(
        '--replay_batch', default=1000, type=int,
        help='Replay: records emitted between two watermark advances.')
    parser.add_argument(
        '--allowed_lateness', default='1h',
        help='How far behind an event may be and still update windowed '
        'aggregates, e.g. 1h; later events are dead-lettered as late.')
    parser.add_argument(
        '--history_features', default='on_watermark',
        choices=('on_watermark', 'on_arrival'),
        help='When an event\'s history features are computed. on_watermark '
        '(default): once the watermark passes it, with every earlier event '
        'of its entity whatever their arrival order (batch\'s row for every '
        'on-time event; latency follows the source\'s watermark, ~1-2 s on '
        'Kafka). on_arrival: as soon as it arrives, with every earlier event '
        'of its entity that arrived before it (batch\'s row when an '
        'entity\'s events arrive in event-time order, as Kafka keeps '
        'them per key; low latency).')
    parser.add_argument(
        '--early_firing', default='60s',
        help='Processing time between early (speculative) aggregate panes.')
    parser.add_argument(
        '--dedupe_horizon', default='24h',
        help='How long (event time) an id is remembered to drop duplicates.')
    parser.add_argument(
        '--file_every', default='60s',
        help='Processing time between two files of each output under '
        '--output_dir (every output is also flushed when the stream ends).')
    parser.add_argument(
        '--model_watch_pattern', default=None,
        help='Glob of model metadata.json files to switch to as they '
        'appear, e.g. gs://bucket/models/*/metadata.json; --model_dir is '
        'the first model. Needs a runner with streaming side inputs '
        '(Dataflow, Flink), not the DirectRunner.')
    parser.add_argument(
        '--model_watch_interval', default=360.0, type=float,
        help='Seconds between two matches of --model_watch_pattern.')
    parser.add_argument(
        '--metrics_port', default=None, type=int,
        help='Serve Prometheus metrics on 127.0.0.1:PORT/metrics while the '
        'job runs (see pipelines.outputs.metrics).')


class FlinkJavaOptions(PipelineOptions):
  """Java FlinkPipelineOptions that Beam's Python SDK does not declare.

  The FlinkRunner sends the job server only the flags some Python
  PipelineOptions class declares (unknown ones are dropped unless
  --flink_submit_uber_jar), so these are declared here to reach it; the
  job server maps checkpointing_interval to checkpointingInterval, etc.
  Unset (None) flags are not sent: Flink's defaults apply.
  """

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--checkpointing_interval', default=None, type=int,
        help='Flink: milliseconds between checkpoints (default: none).')
    parser.add_argument(
        '--shutdown_sources_after_idle_ms', default=None, type=int,
        help='Flink: milliseconds before a source that has finished is shut '
        'down. Without checkpoints Flink shuts it down at once, which ends '
        'an unbounded Kafka read; pipelines.streaming sets it for one.')
    parser.add_argument(
        '--max_bundle_size', default=None, type=int,
        help='Flink: most elements in one bundle (Flink default 1000).')
    parser.add_argument(
        '--max_bundle_time_mills', default=None, type=int,
        help='Flink: most milliseconds one bundle stays open before its '
        'outputs go downstream (Flink default 1000).')
    parser.add_argument(
        '--execution_mode_for_batch', default=None,
        choices=('PIPELINED', 'BATCH_FORCED'),
        help='Flink, batch: BATCH_FORCED makes every exchange blocking, so '
        'each task runs as a slot frees and --parallelism may exceed the '
        'slots. Flink runs a batch stage\'s whole partition as one bundle '
        'and holds its outputs until the bundle ends: more partitions, '
        'smaller bundles (Flink default PIPELINED).')


def flags(options: PipelineOptions, options_class) -> types.SimpleNamespace:
  """RecordOptions' flags and `options_class`'s, read as one namespace."""
  values = {}
  for cls in (RecordOptions, options_class):
    values.update(options.view_as(cls).get_all_options(current_only=True))
  return types.SimpleNamespace(**values)


def print_help(prog: str, options_class):
  """Our flags' help: the shared ones and `options_class`'s (Beam parses
  flags itself and would only show -h)."""
  parser = argparse.ArgumentParser(
      prog=prog, epilog='Every other flag (--runner, --temp_location, '
      '--flink_master, --project, ...) goes to Beam and the runner.')
  RecordOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  options_class._add_argparse_args(parser)  # pylint: disable=protected-access
  parser.print_help()


def aggregate_window(options, dataset: Dataset):
  """(size, period) in seconds of the entity aggregate windows."""
  size = parse_duration(options.window_size or
                        dataset.aggregates.get('window_size', '24h'))
  period = parse_duration(options.window_period or
                          dataset.aggregates.get('window_period', size))
  if period > size or size % period:
    raise SchemaError(f'--window_period {period}s must divide '
                      f'--window_size {size}s')
  return size, period


def reference_micros(options) -> Optional[int]:
  """--reference_time as epoch microseconds, or None."""
  if not options.reference_time:
    return None
  try:
    return rfc3339_to_micros(options.reference_time)
  except ValueError as e:
    raise InputError(f'--reference_time: {e}') from None
