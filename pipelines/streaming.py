"""The streaming pipeline: events -> features -> (score) -> sinks, as they come.

    python -m pipelines.streaming --input data/sample/transactions.jsonl \\
        --output_dir /tmp/stream

replays a file as an in-order stream on the DirectRunner and stops when it
ends;

    python -m pipelines.streaming --runner DataflowRunner ... \\
        --input_subscription projects/P/subscriptions/S \\
        --output_topic projects/P/topics/T --model_dir gs://B/model

reads JSON records from Pub/Sub until cancelled; and

    python -m pipelines.streaming --runner FlinkRunner \\
        --flink_master localhost:8081 --environment_type LOOPBACK \\
        --flink_job_server_jar runners/.jars/beam-flink-job-server.jar \\
        --bootstrap_servers 127.0.0.1:9092 --input_topic transactions \\
        --output_topic predictions --dead_letter_topic dead_letter \\
        --model_dir /tmp/out/model --output_dir /tmp/stream

reads Kafka (transforms.kafka, in the Python workers) until cancelled, or
until --max_num_records records. Every element is a pyarrow.RecordBatch,
as in batch, and keyed steps move (shard, RecordBatch) pairs. Stages, each
the streaming form of the module that also holds its batch form
(transforms.stream_sources, parse, history_features, aggregates,
inference, online_store, sinks; aggregates has the lateness rule,
history_features the event-order rule): parse and validate with the batch
validator, drop duplicate ids, join side tables, point-in-time history
features per shard of entities (batch's history_table on the shard's
retained history), windowed entity aggregates with early/on-time/late
panes, optional scoring (ScoreBatches: `--model_dir`, or any `scorer`
passed to build_pipeline; with
`--model_watch_pattern`, new models replace it without a restart, see
model_scorer), and sinks:
JSON lines under <output_dir>/streaming/ ({features, predictions,
aggregates/<key>, dead_letter}/<name>-<pane>.jsonl, a file per output every
--file_every of processing time and at the end) and Pub/Sub topics
(--output_topic, --dead_letter_topic), or Kafka topics with
--bootstrap_servers. Counters (namespace mlpipe):
records_read, records_valid, records_dead_lettered, records_late,
feature_rows, feature_rows_scored, predictions_written (run_summary.json of
a replay counts the output files instead: see summarize_outputs).
"""

import collections
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Dict, List, Optional

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.runners.runner import PipelineState

from pipelines.cli.shell import run_command
from pipelines.outputs import metrics
from pipelines.outputs import files
from pipelines.cli import flink_rest, preflight
from pipelines.model.registry import PROMOTIONS, Registry
from pipelines.outputs.summary import ingest_lines
from pipelines.cli.options import (FlinkJavaOptions, RecordOptions,
                               StreamingOptions,
                               aggregate_window, flags,
                               print_help, reference_micros)
from schemas.dataset import Dataset, SchemaError, load_dataset, parse_duration
from transforms.inference import ScoreBatches, verify_model_dir
from transforms.aggregates import (AGGREGATES, LATE,
                                   StreamingEntityAggregates)
from transforms.common import (DEAD_LETTER, VALID, CountRows,
                               micros_to_rfc3339)
from transforms.history_features import StatefulHistoryFeatures
from transforms import online_store
from transforms.kafka import ReadKafkaRecords, WriteJsonToKafka
from transforms.parse import StreamingParseAndValidate
from transforms.read import InputError, check_input
from transforms.side_tables import (JoinSideTables, load_side_tables,
                                    side_table_paths)
from transforms.stream_sources import (MessageBatches, ReadPubSubRecords,
                                       ReplayFile)
from transforms.sinks import WriteJsonLinesPanes, WriteJsonToPubSub

# Everything goes under <output_dir>/streaming/, apart from batch outputs.
STREAMING = 'streaming'
FEATURES, PREDICTIONS, DEAD = 'features', 'predictions', 'dead_letter'
# Shards of each keyed step (dedupe by id, history and aggregates by
# entity): elements are (shard, RecordBatch) pairs, and each shard's state
# is read and written once per batch. More shards cut every poll's batch
# into more, smaller elements, each paying every keyed step's fixed cost
# (Kafka on Flink at parallelism 2 with the batch-per-poll read,
# bench/RESULTS.md: 100,000 events at once 10,655 events/s with 2 shards,
# 6,880 with 4; paced p50 0.4 s either way. With KafkaIO's per-record read
# 4 had been best.)
STREAM_SHARDS = 2


@dataclasses.dataclass(frozen=True)
class StreamSettings:
  """Durations in seconds, from the flags and the declaration."""
  window_size: int
  window_period: int
  allowed_lateness: int
  early_firing: int
  dedupe_horizon: int
  file_every: int


def _seconds(flag: str, text: str) -> int:
  try:
    return parse_duration(text)
  except SchemaError as e:
    raise InputError(f'--{flag}: {e}') from None


def settings(opts, dataset: Dataset) -> StreamSettings:
  """`opts`: the flags of pipelines.streaming (options.flags)."""
  size, period = aggregate_window(opts, dataset)
  values = StreamSettings(
      size, period, _seconds('allowed_lateness', opts.allowed_lateness),
      _seconds('early_firing', opts.early_firing),
      _seconds('dedupe_horizon', opts.dedupe_horizon),
      _seconds('file_every', opts.file_every))
  if values.early_firing <= 0 or values.file_every <= 0:
    raise InputError('--early_firing and --file_every must be positive')
  if opts.replay_speed is not None and opts.replay_speed <= 0:
    raise InputError(f'--replay_speed must be positive, got '
                     f'{opts.replay_speed}')
  return values


# Runners whose side inputs cannot follow an unbounded global-window watch.
_DIRECT_RUNNERS = ('directrunner', 'switchingdirectrunner',
                   'bundlebaseddirectrunner')


def _runner_name(options: PipelineOptions) -> str:
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  if not isinstance(runner, str):
    runner = type(runner).__name__
  return runner.rsplit('.', 1)[-1].lower()


def stream_shards(options: PipelineOptions) -> int:
  """Shards of the keyed steps: STREAM_SHARDS, or one on the DirectRunner,
  which runs every shard in one process anyway and spends ~3 ms of
  bookkeeping on each bundle of each key in each step (bench/RESULTS.md):
  more shards there only cost more bundles. --stream_shards sets it."""
  chosen = options.view_as(StreamingOptions).stream_shards
  if chosen is not None:
    if chosen < 1:
      raise InputError('--stream_shards must be positive')
    return chosen
  return 1 if _runner_name(options) in _DIRECT_RUNNERS else STREAM_SHARDS


def check_streamable(dataset: Dataset):
  """Raises InputError for a declaration the stream cannot follow: events
  need a time (every other declaration streams: any number of histories,
  side tables)."""
  if not dataset.timestamp_field:
    raise InputError(f'{dataset.name}: a stream needs roles.timestamp (the '
                     'event time)')


def check_model_watch(opts, options: PipelineOptions):
  """Raises InputError when --model_watch_pattern cannot work (see
  model_scorer for why the DirectRunner is refused)."""
  if not opts.model_watch_pattern:
    return
  if not opts.model_dir:
    raise InputError('--model_watch_pattern needs --model_dir (the model '
                     'that scores until a newer one appears)')
  if opts.model_watch_interval <= 0:
    raise InputError(f'--model_watch_interval must be positive, got '
                     f'{opts.model_watch_interval}')
  if _runner_name(options) in _DIRECT_RUNNERS:
    raise InputError('--model_watch_pattern needs a runner with streaming '
                     'side inputs (Dataflow, Flink); on the DirectRunner '
                     'scoring would wait for the watch to end, i.e. forever')


def model_scorer(opts, dataset: Dataset,
                 p: Optional[beam.Pipeline] = None
                 ) -> Optional[beam.PTransform]:
  """ScoreBatches (RunInference on feature RecordBatches, the batch job's
  scorer) on --model_dir, or None without it.

  With --model_watch_pattern (a glob of model metadata.json files, e.g.
  gs://b/models/*/metadata.json, or a registry's promotions/*.json), the
  scoring step matches it at most every --model_watch_interval seconds
  (ScoreWithLatestModel): --model_dir scores first, files present at start
  are ignored, and the file updated last names the model (a new, unique
  directory, metadata.json written last; or a pointer to one), which is
  verified and loaded; predictions carry its model_version from then on.
  No restart, no drain. (WatchFilePattern as RunInference's side input
  never switched on Flink: see ScoreWithLatestModel.) run() still refuses
  the watch on the DirectRunner (check_model_watch). `p` is unused.
  """
  if not opts.model_dir:
    return None
  # The scoring step matches the pattern itself (ScoreWithLatestModel):
  # WatchFilePattern's side input never switched on Flink.
  return ScoreBatches(opts.model_dir, id_field=dataset.id_field,
                      model_watch_pattern=opts.model_watch_pattern,
                      model_watch_interval=opts.model_watch_interval,
                      scored_at=micros_to_rfc3339(reference_micros(opts))
                      if opts.reference_time else None)


def build_pipeline(p: beam.Pipeline, options: PipelineOptions,
                   dataset: Optional[Dataset] = None,
                   scorer: Optional[beam.PTransform] = None
                   ) -> Dict[str, object]:
  """Builds the streaming job; returns the PCollections that tests check.

  Every element is a pyarrow.RecordBatch, as in batch: raw batches from
  the source, then valid records, feature rows, predictions, aggregate
  rows and dead-letter rows. `scorer`: PCollection[pa.RecordBatch] feature
  rows -> PCollection[pa.RecordBatch] predictions (default: ScoreBatches
  on --model_dir when given, else no scoring). Returns raw, valid,
  dead_letter (parse, duplicates and late rows), features, aggregates
  {key: rows}, late {key: rows}, predictions (or None) and
  records_replayed (the number of records a replay emits, else None).
  """
  opts = flags(options, StreamingOptions)
  dataset = dataset or load_dataset(opts.schema)
  s = settings(opts, dataset)
  shards = stream_shards(options)

  replay = None
  kafka = bool(opts.bootstrap_servers)
  if kafka:
    raw = (p
           | 'ReadKafka' >> ReadKafkaRecords(
               opts.bootstrap_servers, opts.input_topic,
               opts.max_num_records)
           | 'DecodeMessageBatches' >> MessageBatches(
               dataset, f'kafka:{opts.input_topic}'))
  elif opts.input_subscription or opts.input_topic:
    raw = p | 'ReadPubSub' >> ReadPubSubRecords(
        dataset, opts.input_subscription, opts.input_topic,
        opts.timestamp_attribute)
  else:
    replay = ReplayFile(opts.input, dataset, opts.input_format,
                        opts.replay_speed, opts.replay_batch)
    raw = p | 'ReplayFile' >> replay
  on_arrival = opts.history_features == 'on_arrival'
  # Features on arrival need each entity's events in arrival order at the
  # history step: the dedupe is then sharded by the (first) history's
  # entity, so no shuffle between the source and that step reorders them.
  dedupe_by = (dataset.histories[0].entity
               if on_arrival and dataset.histories else None)
  parsed = raw | 'ParseAndValidate' >> StreamingParseAndValidate(
      dataset, s.dedupe_horizon, reference_micros(opts), shards, dedupe_by)
  valid = parsed[VALID]
  features = valid
  tables = load_side_tables(dataset, side_table_paths(opts, dataset))
  if tables:
    features = features | 'JoinSideTables' >> JoinSideTables(dataset, tables)
  if dataset.histories:
    features = features | 'HistoryFeatures' >> StatefulHistoryFeatures(
        dataset, s.allowed_lateness, shards, on_arrival)
  if opts.online_store:
    features = features | 'UpdateOnlineStore' >> online_store.UpdateOnlineStore(
        dataset, opts.online_store, online_store.model_version_of(opts.model_dir))
  if scorer is None:
    scorer = model_scorer(opts, dataset, p)
  # One step counts both: every feature row is scored when there is a model.
  features = features | 'CountFeatureRows' >> beam.ParDo(CountRows(
      'feature_rows', *(['feature_rows_scored'] if scorer else [])))

  aggregates, late = {}, {}
  for key in dataset.aggregate_keys:
    out = valid | f'Aggregate[{key}]' >> StreamingEntityAggregates(
        dataset, key, s.window_size, s.window_period, s.allowed_lateness,
        s.early_firing, shards)
    aggregates[key] = out[AGGREGATES] | f'CountAggregates[{key}]' >> (
        beam.ParDo(CountRows(f'aggregate_rows.{key}')))
    late[key] = out[LATE]
  dead = (([parsed[DEAD_LETTER]] + list(late.values()))
          | 'AllDeadLetters' >> beam.Flatten())

  predictions = None
  if scorer is not None:
    predictions = (features
                   | 'Score' >> scorer
                   | 'CountPredictions' >> beam.ParDo(
                       CountRows('predictions_written')))

  root = files.join(opts.output_dir, STREAMING)
  sinks = {FEATURES: (features, files.join(root, FEATURES)),
           DEAD: (dead, files.join(root, DEAD))}
  if predictions is not None:
    sinks[PREDICTIONS] = (predictions, files.join(root, PREDICTIONS))
  for key, rows in aggregates.items():
    sinks[key] = (rows, files.join(root, 'aggregates', key))
  for name, (rows, folder) in sinks.items():
    rows | f'WriteFiles[{name}]' >> WriteJsonLinesPanes(
        folder, name, s.file_every, shards)
  published = predictions if predictions is not None else features
  if kafka and opts.output_topic:
    (published
     | 'PublishToKafka' >> WriteJsonToKafka(
         opts.bootstrap_servers, opts.output_topic, dataset.id_field))
  elif opts.output_topic:
    published | 'Publish' >> WriteJsonToPubSub(opts.output_topic)
  if kafka and opts.dead_letter_topic:
    (dead
     | 'PublishDeadLettersToKafka' >> WriteJsonToKafka(
         opts.bootstrap_servers, opts.dead_letter_topic))
  elif opts.dead_letter_topic:
    dead | 'PublishDeadLetters' >> WriteJsonToPubSub(opts.dead_letter_topic)

  return {'raw': raw, VALID: valid, DEAD_LETTER: dead, 'features': features,
          'aggregates': aggregates, 'late': late, 'predictions': predictions,
          'records_replayed': replay.replayed if replay else None}


def _rows(folder: str) -> List[dict]:
  match = FileSystems.match([files.join(folder, '*.jsonl')])[0]
  rows = []
  for meta in match.metadata_list:
    with FileSystems.open(meta.path) as f:
      text = f.read().decode('utf-8')
    rows += [json.loads(line) for line in text.splitlines() if line.strip()]
  return rows


def summarize_outputs(root: str, dataset: Dataset,
                      records_replayed: Optional[int]) -> Dict[str, object]:
  """The run summary of a finished replay, counted from the files written.
  `records_replayed` None (an unbounded read that was stopped): the records
  read are those the files account for.

  The steps also increment Beam counters (namespace mlpipe) for runners
  that report them, but the DirectRunner in streaming mode (Beam 2.72)
  credits each step's counters with its first bundle only, so a local
  replay counts its output rows instead.
  """
  dead = _rows(files.join(root, DEAD))
  kinds = collections.Counter(row['error_kind'] for row in dead)
  late = kinds.pop(LATE, 0)
  valid = len(_rows(files.join(root, FEATURES)))
  dead_lettered = sum(kinds.values())
  if records_replayed is None:
    records_replayed = valid + dead_lettered
  keys = dataset.aggregate_keys
  return {
      'records_read': records_replayed,
      'records_valid': valid,
      'records_dead_lettered': dead_lettered,
      'dead_letter_by_kind': dict(sorted(kinds.items())),
      'records_accounted_for': records_replayed == valid + dead_lettered,
      'records_late': late,
      'feature_rows': valid,
      'aggregate_rows': {k: len(_rows(files.join(root, 'aggregates', k)))
                         for k in keys},
      'predictions_written': len(_rows(files.join(root, PREDICTIONS))),
  }


# Never, in ms: Long.MAX_VALUE does not survive the JSON double that carries
# options to the job server.
_NEVER_MS = 10**15


def keep_sources_up(options: PipelineOptions, opts):
  """An unbounded Kafka read on Flink: keeps finished sources running.

  Without checkpointing, Flink shuts a source down as soon as it has
  emitted everything (shutdown_sources_after_idle_ms 0). The Kafka read
  starts from an Impulse that emits once, so the read's input ends, Flink
  calls finish() on the read and the runner drains the Kafka SDF inside
  that call, forever: the task's mailbox never runs the timers that close
  bundles of the stages chained after it, so their outputs stay buffered
  (seen: 0 records out of the read's task after 500 records read). A
  bounded read (--max_num_records) ends, and is left alone."""
  if opts.max_num_records or _runner_name(options) != 'flinkrunner':
    return
  java = options.view_as(FlinkJavaOptions)
  if java.shutdown_sources_after_idle_ms is None:
    java.shutdown_sources_after_idle_ms = _NEVER_MS


# Flink closes a bundle after 1,000 elements by default: at thousands of
# events a second that cuts every second's events into small batches, and
# each batch pays every Python stage's fixed cost (bench/RESULTS.md: 1,700
# events/s at 1,000, 2,500-3,200 at 10,000). A bundle still closes after
# --max_bundle_time_mills (1 s), so this only matters under load.
FLINK_BUNDLE_SIZE = 10000
# ... and a bundle stays open this long (Flink's default 1,000 ms) while
# every step waits for its outputs: a Kafka event crosses four steps. Paced
# at 1,000 events/s: p50 1.1-1.3 s at 100 ms, 0.8 s at 30 ms; 100,000
# events at once 10,655 events/s at 30 ms (bench/RESULTS.md).
FLINK_BUNDLE_MS = 30
# Flink's job configuration for a Kafka stream (its network buffers' flush
# timeout: runners/flink_job_conf/config.yaml says why).
FLINK_JOB_CONF = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'runners', 'flink_job_conf')


def bigger_bundles(options: PipelineOptions):
  """A Kafka stream on Flink: --max_bundle_size FLINK_BUNDLE_SIZE and
  --max_bundle_time_mills FLINK_BUNDLE_MS unless given."""
  if _runner_name(options) != 'flinkrunner':
    return
  java = options.view_as(FlinkJavaOptions)
  if java.max_bundle_size is None:
    java.max_bundle_size = FLINK_BUNDLE_SIZE
  if java.max_bundle_time_mills is None:
    java.max_bundle_time_mills = FLINK_BUNDLE_MS


@contextlib.contextmanager
def flink_job_conf(options: PipelineOptions, opts):
  """Within the block (the job's submission), a Kafka stream on Flink
  reads Flink's job configuration from FLINK_JOB_CONF, unless FLINK_CONF_DIR
  is set: the job server that `run()` starts reads it from there."""
  own = (opts.bootstrap_servers and _runner_name(options) == 'flinkrunner'
         and 'FLINK_CONF_DIR' not in os.environ)
  if own:
    os.environ['FLINK_CONF_DIR'] = FLINK_JOB_CONF
  try:
    yield
  finally:
    if own:
      del os.environ['FLINK_CONF_DIR']


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
  """Runs the stream until it ends (a replay) or is cancelled (Pub/Sub);
  returns the run summary (also <output_dir>/streaming/run_summary.json)."""
  preflight.check_flags(argv)
  options = PipelineOptions(argv)
  # Processing-time triggers and timers need the streaming runner mode.
  options.view_as(StandardOptions).streaming = True
  files.use_pipeline_options(options)   # s3:// on the driver
  opts = flags(options, StreamingOptions)
  preflight.check_runner(options)
  preflight.check_services(options)
  dataset = load_dataset(opts.schema)
  check_streamable(dataset)
  if opts.online_store:
    online_store.preflight(opts.online_store)
    # The store's description, as the batch job's materialisation writes it.
    client = online_store.connect(opts.online_store, 2.0)
    online_store.write_meta(client, dataset, online_store.DEFAULT_MAX_RECORDS)
    client.close()
  settings(opts, dataset)
  reference_micros(opts)
  if opts.input_subscription and opts.input_topic:
    raise InputError('give --input_subscription or --input_topic, not both')
  streamed = bool(opts.input_subscription or opts.input_topic)
  if opts.bootstrap_servers:
    if _runner_name(options) in _DIRECT_RUNNERS:
      raise InputError('--bootstrap_servers streams on FlinkRunner (see '
                       'runners/README.md); on the DirectRunner, replay a '
                       'file with --input')
    preflight.check_kafka(opts)
    keep_sources_up(options, opts)
    bigger_bundles(options)
    source = f'Kafka topic {opts.input_topic} at {opts.bootstrap_servers}'
  elif streamed:
    source = opts.input_subscription or opts.input_topic
  else:
    source = f'{len(check_input(opts.input, opts.input_format))} file(s) ' \
             f'from {opts.input} (replay)'
  if opts.registry and not opts.model_dir:
    # Score with the champion; on a runner with streaming side inputs,
    # follow its changes (each promotion writes a pointer file).
    opts.model_dir = Registry(opts.registry).champion_dir()
    options.view_as(RecordOptions).model_dir = opts.model_dir
    if (not opts.model_watch_pattern and
        _runner_name(options) not in _DIRECT_RUNNERS):
      opts.model_watch_pattern = files.join(opts.registry, PROMOTIONS, '*.json')
      options.view_as(StreamingOptions).model_watch_pattern = (
          opts.model_watch_pattern)
  check_model_watch(opts, options)
  if opts.model_dir:
    verify_model_dir(opts.model_dir)
  root = files.join(opts.output_dir, STREAMING)
  inputs = [] if streamed else check_input(opts.input, opts.input_format)
  files.check_output_dir(opts.output_dir, inputs + [opts.model_dir], [root])
  files.clear(root)

  print(f'== Streaming: {source}', file=sys.stderr, flush=True)
  # A driver killed outright leaves 'running' here.
  files.write_json(files.join(root, SUMMARY_FILE), {'status': 'running'})
  p = beam.Pipeline(options=options)
  built = build_pipeline(p, options, dataset)
  with flink_job_conf(options, opts):
    result = p.run()
  # Live: each scrape reads the job's counters; then the final summary.
  live = metrics.serve(opts.metrics_port, result) if opts.metrics_port \
      else None
  status = wait_or_stop(result)
  if status == STOPPED and _runner_name(options) == 'flinkrunner':
    flink_rest.cancel_flink_job(options, result)

  read = built['records_replayed']
  if opts.bootstrap_servers and opts.max_num_records:
    read = opts.max_num_records
  if status == STOPPED:
    read = None  # what the files written before the stop account for
  summary = dict(status=status,
                 **summarize_outputs(root, dataset, read))
  summary['output_dir'] = root
  files.write_json(files.join(root, SUMMARY_FILE), summary)
  metrics.write_metrics(summary, files.join(root, metrics.METRICS_FILE))
  if live:
    live[0].update(summary)
  _print_summary(summary)
  return summary


SUMMARY_FILE = 'run_summary.json'
OK, STOPPED = 'ok', 'stopped'


def wait_or_stop(result) -> str:
  """Waits for the job to end: OK when it does, STOPPED when it is
  cancelled, either here (Ctrl-C or SIGTERM to this process: the job is
  then cancelled on the runner) or on the runner (Flink's REST API or UI).
  Any other end raises, as a failed run does.

  A signal that lands while the portable runner's job-state stream is read
  interrupts gRPC's wait, which cancels the stream and raises the RPC
  error instead of KeyboardInterrupt: after a signal, any error is a stop
  (seen: a SIGINT ended the command with exit 3 and the job running on)."""
  main = threading.current_thread() is threading.main_thread()
  stopping = threading.Event()

  def interrupt(signum, frame):
    stopping.set()
    raise KeyboardInterrupt(f'signal {signum}')

  previous = ({sig: signal.signal(sig, interrupt)
               for sig in (signal.SIGINT, signal.SIGTERM)} if main else {})
  try:
    result.wait_until_finish()
    return OK
  except KeyboardInterrupt:
    return _cancel(result)
  except Exception as e:  # pylint: disable=broad-except
    if stopping.is_set():
      return _cancel(result)
    if isinstance(e, RuntimeError) and result.state == PipelineState.CANCELLED:
      return STOPPED
    raise
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _cancel(result) -> str:
  try:
    result.cancel()
  except Exception:  # pylint: disable=broad-except
    pass  # a runner that cannot cancel stops with this process
  return STOPPED


def _print_summary(summary):
  lines = [f'Status:                {summary["status"]}'] + ingest_lines(
      summary) + [
      f'Late for aggregates:   {summary["records_late"]}',
      f'Feature rows:          {summary["feature_rows"]}',
      'Aggregate rows:        ' + ', '.join(
          f'{k}: {v}' for k, v in summary['aggregate_rows'].items()),
      f'Predictions written:   {summary["predictions_written"]}',
      f'Outputs:               {summary["output_dir"]}',
  ]
  print('\n'.join(lines), flush=True)


def main(argv: Optional[List[str]] = None) -> int:
  """Command-line entry: a clear one-line error and exit 2 on bad input."""
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    print_help('python -m pipelines.streaming', StreamingOptions)
    return 0
  # A job that fails on the runner (a Java error on Flink, say) ends with
  # one line, not a stack trace, as the run's last word.
  return run_command(lambda: run(argv) and None)


if __name__ == '__main__':
  sys.exit(main())
