"""Benchmark harness for the batch pipeline (issue 8).

    python -m bench.run                      # 100k and 1M rows
    python -m bench.run --big                # adds 4M
    python -m bench.run --rows 20000         # a quick check
    python -m bench.run --rows 100000 --profile --breakdown

For every size it
  1. generates the data once per (seed, size) with pipelines.generate,
     cached under bench/.cache/s<seed>-n<rows>/ as JSON lines (the
     pipeline's input) and CSV (for TFDV's own CSV path);
  2. trains a model once per cache (an unmeasured full run, kept in
     train/), then measures, each as a subprocess of `pipelines.batch`:
       score  --model_dir <trained model>: ingest, features, aggregates,
              statistics + validation, predict
       full   the same plus tf.Transform and training;
     stage timings come from the '== <stage>' / 'done in X s' lines on
     stderr; memory is the peak resident set of the whole process tree
     (VmRSS summed over the process and its descendants, polled every
     0.2 s from /proc; shared pages counted once per process), per stage
     and overall, plus the largest single process (wait4 ru_maxrss);
  3. runs the peers on the same file: TFDV's `generate_statistics_from_csv`
     on the CSV, our statistics path alone on the features table, and
     bench.pandas_features (single-process pandas history features), whose
     table is compared with the pipeline's features Parquet (OK/MISMATCH);
  4. prints one table (size, run, stage, wall s, CPU s, records/s, peak RSS
     MB), the peers and the targets with PASS/MISS.

Results are also written as JSON under bench/.cache/results/
(`--report <file>` prints their tables again).
Flags: --skip-full, --skip-peers, --peers-only (no pipeline runs),
--keep-going, --seed, --env KEY=VALUE (e.g. OMP_NUM_THREADS=1, set in every
measured process), --profile (cProfile of the ingest job and of the Predict
stage), --breakdown (the ingest job built up step by step, plus two
bench-only prototypes of the recommended changes, see EXPERIMENTS).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
CACHE = os.path.join(BENCH_DIR, '.cache')
PYTHON = sys.executable
DEFAULT_SIZES = (100_000, 1_000_000)
BIG = 4_000_000
POLL_S = 0.2
EXTRA_ENV: Dict[str, str] = {}   # --env KEY=VALUE, for every measured process

# Targets of issue 8.
TARGET_1M_SECONDS = 60.0
TARGET_1M_MB = 2048.0
TARGET_STATS_SPEEDUP = 10.0
TARGET_4M_RATIO = 4.4

_STAGE = re.compile(r'^== (.*)$')
_DONE = re.compile(r'^\s+done in ([0-9.]+) s$')


# Machine -----------------------------------------------------------------------
def machine() -> Dict[str, object]:
  from importlib import metadata
  info = {'nproc': os.cpu_count(), 'python': sys.version.split()[0]}
  try:
    with open('/proc/meminfo') as f:
      mem = dict(line.split(':', 1) for line in f)
    info['memory_gb'] = round(int(mem['MemTotal'].split()[0]) / 2**20, 1)
  except OSError:
    pass
  try:
    with open('/proc/cpuinfo') as f:
      info['cpu'] = next(line.split(':', 1)[1].strip() for line in f
                         if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  versions = {}
  for name in ('apache-beam', 'tensorflow-data-validation',
               'tensorflow-transform', 'tensorflow', 'tfx-bsl', 'pyarrow',
               'pandas', 'numpy', 'scikit-learn'):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  info['packages'] = versions
  return info


def load_average() -> str:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return '?'


# Process tree memory -------------------------------------------------------------
def _children(pid: int) -> List[int]:
  kids = []
  try:
    for tid in os.listdir(f'/proc/{pid}/task'):
      try:
        with open(f'/proc/{pid}/task/{tid}/children') as f:
          kids.extend(int(x) for x in f.read().split())
      except OSError:
        pass
  except OSError:
    pass
  return kids


def _rss_kb(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _cpu_ticks(pid: int, reaped: bool) -> int:
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except (OSError, IndexError):
    return 0
  # fields[11:15] = utime, stime, cutime, cstime (man 5 proc, 14-17)
  ticks = int(fields[11]) + int(fields[12])
  if reaped:
    ticks += int(fields[13]) + int(fields[14])
  return ticks


def _tree(pid: int):
  """`pid` and its live descendants, each once."""
  todo, seen = [pid], set()
  while todo:
    p = todo.pop()
    if p not in seen:
      seen.add(p)
      yield p
      todo.extend(_children(p))


def tree_cpu_s(pid: int) -> float:
  """CPU seconds (user + system) used so far by `pid`, its live descendants
  and the children it has reaped."""
  return sum(_cpu_ticks(p, reaped=p == pid) for p in _tree(pid)) / (
      os.sysconf('SC_CLK_TCK'))


def tree_rss_mb(pid: int) -> float:
  """VmRSS summed over `pid` and all its descendants, in MB."""
  return sum(_rss_kb(p) for p in _tree(pid)) / 1024


class Measured:
  """Runs a command, tees stderr to a log, tracks stages and peak RSS."""

  def __init__(self, cmd: List[str], log_path: str, cwd: str = REPO):
    self.cmd, self.log_path, self.cwd = cmd, log_path, cwd
    self.stages: List[Dict[str, object]] = []
    self.peaks: Dict[str, float] = {}
    self.stage = 'startup'
    self.peak_mb = 0.0
    self.stdout = ''

  def _read_stderr(self, stream, log):
    for raw in stream:
      line = raw.decode('utf-8', 'replace')
      log.write(line)
      line = line.rstrip('\n')
      m = _STAGE.match(line)
      if m:
        name = m.group(1).split(':', 1)[0].strip()
        self.stages.append({'stage': name, 'seconds': None,
                            'cpu_start': tree_cpu_s(self.pid)})
        self.stage = name
        continue
      m = _DONE.match(line)
      if m and self.stages:
        self.stages[-1]['seconds'] = float(m.group(1))
        self.stages[-1]['cpu_s'] = (tree_cpu_s(self.pid) -
                                    self.stages[-1]['cpu_start'])
        self.stage = 'finish'

  def _poll(self, pid: int, done: threading.Event):
    while not done.is_set():
      rss = tree_rss_mb(pid)
      self.peak_mb = max(self.peak_mb, rss)
      self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
      done.wait(POLL_S)

  def run(self) -> Dict[str, object]:
    os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1', **EXTRA_ENV)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    load_before = load_average()
    began = time.monotonic()
    with open(self.log_path, 'w') as log:
      log.write('$ ' + ' '.join(self.cmd) + '\n')
      proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      self.pid = proc.pid
      done = threading.Event()
      out_chunks = []
      readers = [
          threading.Thread(target=self._read_stderr, args=(proc.stderr, log)),
          threading.Thread(target=lambda: out_chunks.append(
              proc.stdout.read())),
          threading.Thread(target=self._poll, args=(proc.pid, done)),
      ]
      for t in readers:
        t.start()
      _, status, usage = os.wait4(proc.pid, 0)
      wall = time.monotonic() - began
      proc.returncode = os.waitstatus_to_exitcode(status)
      done.set()
      for t in readers:
        t.join()
      self.stdout = b''.join(out_chunks).decode('utf-8', 'replace')
      log.write(self.stdout)
    return {
        'rc': proc.returncode, 'wall_s': wall,
        'cpu_s': usage.ru_utime + usage.ru_stime,
        'stages': self.stages, 'stage_peak_mb': self.peaks,
        'peak_tree_mb': self.peak_mb,
        'max_process_mb': usage.ru_maxrss / 1024,
        'load_before': load_before, 'load_after': load_average(),
        'log': self.log_path,
    }


def run_measured(cmd: List[str], log_path: str, what: str
                 ) -> Dict[str, object]:
  print(f'  {what} ...', end='', flush=True, file=sys.stderr)
  result = Measured(cmd, log_path).run()
  print(f' {result["wall_s"]:.1f} s, peak {result["peak_tree_mb"]:.0f} MB'
        + ('' if result['rc'] == 0 else f'  FAILED rc={result["rc"]} '
           f'(see {log_path})'), file=sys.stderr, flush=True)
  return result


# Data and model caches -----------------------------------------------------------
def cache_dir(seed: int, rows: int) -> str:
  return os.path.join(CACHE, f's{seed}-n{rows}')


def _generate(directory: str, seed: int, rows: int):
  """(In a subprocess) the benchmark files, JSON lines and CSV."""
  from pipelines.generate import generate_transactions, write_records
  began = time.monotonic()
  records = generate_transactions(rows, None, seed)
  generated = time.monotonic() - began
  os.makedirs(directory, exist_ok=True)
  for ext in ('jsonl', 'csv'):
    tmp = os.path.join(directory, f'.transactions.{ext}.tmp')
    write_records(records, tmp, ext)
    os.replace(tmp, os.path.join(directory, f'transactions.{ext}'))
  meta = {'seed': seed, 'rows': rows, 'generate_s': generated,
          'total_s': time.monotonic() - began,
          'jsonl_bytes': os.path.getsize(
              os.path.join(directory, 'transactions.jsonl')),
          'created': datetime.datetime.now().isoformat(timespec='seconds')}
  with open(os.path.join(directory, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)


def ensure_data(seed: int, rows: int) -> str:
  directory = cache_dir(seed, rows)
  if not os.path.exists(os.path.join(directory, 'meta.json')):
    print(f'  generating {rows} rows (seed {seed}) ...', end='', flush=True,
          file=sys.stderr)
    began = time.monotonic()
    subprocess.run([PYTHON, '-m', 'bench.run', '--_generate', directory,
                    '--seed', str(seed), '--rows', str(rows)], cwd=REPO,
                   check=True)
    print(f' {time.monotonic() - began:.1f} s', file=sys.stderr, flush=True)
  return directory


def batch_cmd(data: str, output_dir: str, model_dir: Optional[str] = None
              ) -> List[str]:
  cmd = [PYTHON, '-m', 'pipelines.batch', '--runner', 'DirectRunner',
         '--input', os.path.join(data, 'transactions.jsonl'),
         '--output_dir', output_dir, '--no-fail_on_anomalies']
  if model_dir:
    cmd += ['--model_dir', model_dir]
  return cmd


def ensure_model(data: str) -> str:
  """A model trained on this cache's data (once): train/model."""
  train_dir = os.path.join(data, 'train')
  model = os.path.join(train_dir, 'model')
  if not os.path.exists(os.path.join(model, 'metadata.json')):
    result = run_measured(batch_cmd(data, train_dir),
                          os.path.join(data, 'logs', 'train.log'),
                          'training a model (not measured)')
    if result['rc'] != 0:
      raise RuntimeError(f'training run failed: see {result["log"]}')
  return model


# Peers -----------------------------------------------------------------------------
def _tfdv_csv(csv_path: str, output: str):
  """(In a subprocess) TFDV's own CSV path; prints the seconds it took."""
  import pipelines.quiet  # noqa: F401
  from pipelines.quiet import import_tfdv
  tfdv = import_tfdv()
  began = time.monotonic()
  tfdv.generate_statistics_from_csv(data_location=csv_path,
                                    output_path=output)
  print(json.dumps({'seconds': time.monotonic() - began}))


def _stats_in_memory(features_dir: str, output: str):
  """(In a subprocess) the floor: the features Parquet as one Arrow table,
  converted column-wise and handed to TFDV's in-memory generator (no
  Beam, no Python rows)."""
  import pipelines.quiet  # noqa: F401
  import pyarrow.parquet as pq
  from schemas.dataset import load_dataset
  from transforms.statistics import stats_options, tfdv
  from tensorflow_data_validation.statistics import stats_impl
  dataset = load_dataset()
  began = time.monotonic()
  table = pq.read_table(features_dir)
  batch, = _to_tfxio_batches(table, dataset.feature_types(),
                             rows_per_batch=max(table.num_rows, 1))
  stats = stats_impl.generate_statistics_in_memory(batch,
                                                   stats_options(dataset))
  tfdv.write_stats_text(stats, output)
  print(json.dumps({'seconds': time.monotonic() - began}))


def _predict_only(features_dir: str, model_dir: str, output_dir: str):
  """(In a subprocess) the Predict stage alone; prints its seconds."""
  import pipelines.quiet  # noqa: F401
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from pipelines import model_stages
  from schemas.dataset import load_dataset
  dataset = load_dataset()
  began = time.monotonic()
  p = beam.Pipeline(options=PipelineOptions(['--runner', 'DirectRunner']))
  model_stages.build_score(p, dataset, os.path.join(features_dir,
                                                    '*.parquet'),
                           model_dir, output_dir)
  p.run().wait_until_finish()
  print(json.dumps({'seconds': time.monotonic() - began}))


def _our_stats(features_dir: str, output: str, arrow_direct: bool):
  """(In a subprocess) our statistics path alone, on the features table:
  rows -> TFXIO batches -> tfdv.GenerateStatistics (what the ingest job
  does), or with `arrow_direct` Parquet batches straight to TFXIO
  columns (an experiment, no Python dicts)."""
  import pipelines.quiet  # noqa: F401
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from pipelines.model_stages import ReadFeatureRows
  from schemas.dataset import load_dataset
  from transforms.statistics import (GenerateFeatureStatistics,
                                     WriteStatistics, stats_options, tfdv)
  dataset = load_dataset()
  pattern = os.path.join(features_dir, '*.parquet')
  began = time.monotonic()
  with beam.Pipeline(options=PipelineOptions(['--runner',
                                              'DirectRunner'])) as p:
    if arrow_direct:
      stats = (p
               | beam.io.ReadFromParquetBatched(pattern)
               | beam.FlatMap(_to_tfxio_batches, dataset.feature_types())
               | tfdv.GenerateStatistics(stats_options(dataset)))
    else:
      stats = (p
               | ReadFeatureRows(pattern)
               | GenerateFeatureStatistics(dataset))
    stats | WriteStatistics(output)
  print(json.dumps({'seconds': time.monotonic() - began}))


def _to_tfxio_batches(table, types, rows_per_batch: int = 10000):
  """A plain Arrow table -> TFXIO RecordBatches (large_list columns),
  column-wise, without Python row dicts."""
  import numpy as np
  import pyarrow as pa
  from transforms.arrow import _TFXIO_TYPES, tfxio_arrow_schema
  table = table.select(list(types))
  schema = tfxio_arrow_schema(types)
  for start in range(0, table.num_rows, rows_per_batch):
    part = table.slice(start, rows_per_batch)
    arrays = []
    for name, kind in types.items():
      col = part.column(name).combine_chunks()
      if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
      col = col.cast(_TFXIO_TYPES[kind])
      valid = col.is_valid()
      # one value per present row, a null list for a missing value
      lengths = np.asarray(valid.to_numpy(zero_copy_only=False), np.int64)
      offsets = np.concatenate([[0], np.cumsum(lengths)])
      values = col.drop_null()
      mask = None if col.null_count == 0 else pa.array(
          ~lengths.astype(bool))
      arrays.append(pa.LargeListArray.from_arrays(
          pa.array(offsets, pa.int64()), values, mask=mask))
    yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def peers(data: str, features_dir: Optional[str], logs: str
          ) -> Dict[str, object]:
  """The peers; without `features_dir` (no pipeline run, --peers-only)
  the pandas table is written and the statistics peers read it instead."""
  out = {}
  cmd = [PYTHON, '-m', 'bench.pandas_features', '--input',
         os.path.join(data, 'transactions.jsonl'), '--json']
  if features_dir:
    cmd += ['--compare', features_dir]
  else:
    features_dir = os.path.join(data, 'pandas_features')
    os.makedirs(features_dir, exist_ok=True)
    cmd += ['--output', os.path.join(features_dir, 'part.parquet')]
  result = run_measured(cmd, os.path.join(logs, 'pandas.log'),
                        'pandas features')
  try:
    result['result'] = json.loads(result_stdout_last_line(result))
  except ValueError:
    result['result'] = {'check': 'ERROR'}
  if '--compare' not in cmd:
    result['result']['check'] = 'n/a (no pipeline run)'
    result['result'].pop('write_s', None)
  out['pandas'] = result
  tmp = os.path.join(data, 'peers')
  os.makedirs(tmp, exist_ok=True)
  for name, cmd in (
      ('tfdv_csv', ['--_tfdv_csv', os.path.join(data, 'transactions.csv'),
                    os.path.join(tmp, 'tfdv_csv.stats')]),
      ('our_stats', ['--_our_stats', features_dir,
                     os.path.join(tmp, 'ours.stats.pb')]),
      ('our_stats_arrow', ['--_our_stats_arrow', features_dir,
                           os.path.join(tmp, 'ours_arrow.stats.pb')]),
      ('stats_in_memory', ['--_stats_in_memory', features_dir,
                           os.path.join(tmp, 'in_memory.stats.pbtxt')])):
    result = run_measured([PYTHON, '-m', 'bench.run'] + cmd,
                          os.path.join(logs, f'{name}.log'), name)
    try:
      result['inner_s'] = json.loads(result_stdout_last_line(result))[
          'seconds']
    except (ValueError, KeyError):
      result['inner_s'] = None
    out[name] = result
  return out


def result_stdout_last_line(result) -> str:
  with open(result['log']) as f:
    lines = [l for l in f.read().splitlines() if l.startswith('{')]
  return lines[-1] if lines else ''


# Step-by-step ingest and profile -----------------------------------------------------
STEPS = ('read', 'parse', 'history', 'statistics', 'aggregates', 'writes')
# Experiments (bench-only prototypes of the recommendations, same outputs):
#   x-aggregates  'statistics' + the entity aggregates keyed by (key, window
#                 start) and combined in the global window, no Beam windows
#   x-writes      'x-aggregates' + every output written, Parquet from
#                 batches of rows (pa.Table.from_pylist, WriteToParquetBatched)
EXPERIMENTS = ('x-aggregates', 'x-writes')


class _AggregatesByWindowKey(object):
  """Fixed event-time windows as part of the key: what EntityAggregates
  computes, without WindowInto (no runner-side trigger driver)."""

  @staticmethod
  def expand(records, dataset, key_field, size_s, label):
    import apache_beam as beam
    from transforms.parse import micros_to_rfc3339

    from transforms.aggregates import AggregateAmounts as AggregateFn

    ts, value = dataset.timestamp_field, dataset.history.value
    lab = dataset.label_field
    size = size_s * 1_000_000

    def key_of(r):
      t = r[ts]
      return ((r[key_field], t - t % size),
              (r[value], r.get(lab) if lab else None))

    def to_row(element):
      (key, start), (count, cents, labelled, positives) = element
      total = cents / 100
      return {key_field: key, 'window_start': micros_to_rfc3339(start),
              'window_end': micros_to_rfc3339(start + size),
              'count': count, 'total_amount': total,
              'mean_amount': total / count,
              'fraud_rate': positives / labelled if labelled else None}

    return (records
            | f'{label}KeyByWindow' >> beam.Map(key_of)
            | f'{label}Combine' >> beam.CombinePerKey(AggregateFn())
            | f'{label}ToRow' >> beam.Map(to_row))


def _write_parquet_batched(pcoll, path, schema, label):
  import apache_beam as beam
  import pyarrow as pa
  return (pcoll
          | f'{label}Batch' >> beam.BatchElements(min_batch_size=1000,
                                                  max_batch_size=20000)
          | f'{label}ToTable' >> beam.Map(
              lambda rows: pa.Table.from_pylist(rows, schema=schema))
          | f'{label}Write' >> beam.io.WriteToParquetBatched(
              path, schema, file_name_suffix='.parquet'))


def _ingest_prefix(input_path: str, output_dir: str, step: str):
  """(In a subprocess) the ingest job up to `step`; prints its seconds."""
  import pipelines.quiet  # noqa: F401
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from pipelines import batch
  from schemas.dataset import load_dataset
  from transforms.aggregates import EntityAggregates
  from transforms.history import HistoryFeatures
  from transforms.parse import VALID, ParseAndValidate
  from transforms.read import ReadRecords
  from transforms.statistics import GenerateFeatureStatistics
  dataset = load_dataset()
  options = PipelineOptions(['--runner', 'DirectRunner', '--input',
                             input_path, '--output_dir', output_dir])
  experiment = step in EXPERIMENTS
  upto = STEPS.index('aggregates' if experiment else step)
  began = time.monotonic()
  p = beam.Pipeline(options=options)
  if experiment:
    from pipelines import io as pio
    from transforms.parse import DEAD_LETTER
    raw = p | ReadRecords(input_path)
    parsed = raw | ParseAndValidate(dataset)
    valid = parsed[VALID]
    features = valid | HistoryFeatures(dataset)
    stats = features | GenerateFeatureStatistics(dataset)
    aggregates = {
        key: _AggregatesByWindowKey.expand(valid, dataset, key, 86400,
                                           f'XAgg[{key}]')
        for key in dataset.aggregates.get('keys', [])}
    if step == 'x-aggregates':
      stats | 'DrainStats' >> beam.FlatMap(lambda x: ())
      for key, rows in aggregates.items():
        rows | f'DrainAgg[{key}]' >> beam.FlatMap(lambda x: ())
    else:
      from transforms.statistics import WriteStatistics
      out = output_dir
      _write_parquet_batched(valid, pio.join(out, 'silver', dataset.name),
                             dataset.arrow_schema(), 'Silver')
      _write_parquet_batched(
          features, pio.join(out, 'features', dataset.name),
          dataset.arrow_schema(dataset.feature_types()), 'Features')
      parsed[DEAD_LETTER] | 'WriteDead' >> pio.WriteJsonLines(
          pio.join(out, 'dead_letter', 'dead_letter'))
      stats | WriteStatistics(pio.join(out, 'statistics', 'stats.pb'))
      for key, rows in aggregates.items():
        _write_parquet_batched(rows, pio.join(out, 'aggregates', key, key),
                               batch._aggregate_schema(key), f'Agg[{key}]')
  elif step == 'writes':
    batch.build_pipeline(p, options, dataset)
  else:
    drain = lambda pc, label: pc | label >> beam.FlatMap(lambda x: ())
    raw = p | ReadRecords(input_path)
    if upto == 0:
      drain(raw, 'DrainRaw')
    else:
      valid = (raw | ParseAndValidate(dataset))[VALID]
      if upto == 1:
        drain(valid, 'DrainValid')
      else:
        features = valid | HistoryFeatures(dataset)
        if upto == 2:
          drain(features, 'DrainFeatures')
        else:
          drain(features | GenerateFeatureStatistics(dataset), 'DrainStats')
        if upto >= 4:
          for key in dataset.aggregates.get('keys', []):
            drain(valid | f'Agg[{key}]' >> EntityAggregates(
                dataset, key, 86400, 86400), f'DrainAgg[{key}]')
  p.run().wait_until_finish()
  print(json.dumps({'step': step, 'seconds': time.monotonic() - began}))


def breakdown(data: str, logs: str) -> List[Dict[str, object]]:
  rows = []
  for step in STEPS + EXPERIMENTS:
    out = os.path.join(data, 'breakdown', step)
    result = run_measured(
        [PYTHON, '-m', 'bench.run', '--_ingest_prefix', step,
         os.path.join(data, 'transactions.jsonl'), out],
        os.path.join(logs, f'breakdown-{step}.log'), f'ingest up to {step}')
    try:
      result['inner_s'] = json.loads(result_stdout_last_line(result))[
          'seconds']
    except (ValueError, KeyError):
      result['inner_s'] = None
    result['step'] = step
    rows.append(result)
  return rows


def profile(data: str, logs: str, model: str, top: int = 60) -> List[str]:
  """cProfile of the ingest job (build_pipeline) and of the Predict stage
  (DirectRunner runs them in one process); returns the text reports."""
  import io
  import pstats
  reports = []
  jobs = {
      'ingest': ['--_ingest_prefix', 'writes',
                 os.path.join(data, 'transactions.jsonl'),
                 os.path.join(data, 'profile_out')],
      'predict': ['--_predict_only',
                  os.path.join(data, 'run_score', 'features'), model,
                  os.path.join(data, 'profile_predict_out')],
  }
  for name, args in jobs.items():
    stats_file = os.path.join(data, f'{name}.prof')
    report = os.path.join(logs, f'{name}-profile.txt')
    run_measured([PYTHON, '-m', 'cProfile', '-o', stats_file, '-m',
                  'bench.run'] + args, os.path.join(logs, f'profile-{name}.log'),
                 f'cProfile of {name}')
    text = io.StringIO()
    stats = pstats.Stats(stats_file, stream=text)
    stats.sort_stats('cumulative').print_stats(top)
    stats.sort_stats('tottime').print_stats(top)
    with open(report, 'w') as f:
      f.write(text.getvalue())
    reports.append(report)
  return reports


# Report ------------------------------------------------------------------------------
def _fmt(value, spec='.1f', missing='-'):
  return missing if value is None else format(value, spec)


def _rate(rows, seconds):
  return None if not seconds else rows / seconds


def _verdict(ok: Optional[bool]) -> str:
  return 'n/a' if ok is None else ('PASS' if ok else 'MISS')


def table(results: List[Dict[str, object]]) -> str:
  lines = ['| size | run | stage | wall s | CPU s | records/s | '
           'peak RSS MB |', '|---:|---|---|---:|---:|---:|---:|']
  for r in results:
    rows = r['rows']
    for kind in ('score', 'full'):
      run = r.get(kind)
      if not run:
        continue
      staged = 0.0
      for s in run['stages']:
        sec = s['seconds']
        staged += sec or 0.0
        lines.append(
            f'| {rows:,} | {kind} | {s["stage"]} | {_fmt(sec)} | '
            f'{_fmt(s.get("cpu_s"))} | '
            f'{_fmt(_rate(rows, sec), ",.0f")} | '
            f'{_fmt(run["stage_peak_mb"].get(s["stage"]), ".0f")} |')
      lines.append(f'| {rows:,} | {kind} | startup + exit (imports, '
                   f'checks) | {_fmt(run["wall_s"] - staged)} | | | '
                   f'{_fmt(run["stage_peak_mb"].get("startup"), ".0f")} |')
      lines.append(
          f'| {rows:,} | {kind} | **total** | **{_fmt(run["wall_s"])}** | '
          f'{_fmt(run["cpu_s"])} | {_fmt(_rate(rows, run["wall_s"]), ",.0f")}'
          f' | **{_fmt(run["peak_tree_mb"], ".0f")}** (max 1 process '
          f'{_fmt(run["max_process_mb"], ".0f")}) |'
          + ('' if run['rc'] == 0 else f' FAILED rc={run["rc"]}'))
    p = r.get('peers')
    if p:
      pd_ = p['pandas']
      res = pd_.get('result', {})
      lines.append(
          f'| {rows:,} | peer | pandas history features (read '
          f'{_fmt(res.get("read_s"), ".2f")} + features '
          f'{_fmt(res.get("features_s"), ".2f")}), check vs pipeline: '
          f'**{res.get("check", "?")}** | {_fmt(res.get("total_s"), ".2f")} '
          f'| {_fmt(pd_["cpu_s"])} | '
          f'{_fmt(_rate(rows, res.get("total_s")), ",.0f")} | '
          f'{_fmt(pd_["peak_tree_mb"], ".0f")} |')
      for name, label in (
          ('tfdv_csv', 'TFDV generate_statistics_from_csv (CSV, 10 cols)'),
          ('our_stats', 'ours: features Parquet -> dict rows -> TFXIO -> '
           'GenerateStatistics (29 cols)'),
          ('our_stats_arrow', 'experiment: features Parquet -> Arrow '
           'columns -> GenerateStatistics (29 cols)'),
          ('stats_in_memory', 'experiment: features Parquet -> one Arrow '
           'batch -> TFDV in-memory generator, no Beam (29 cols)')):
        run = p.get(name)
        if not run:
          continue
        lines.append(
            f'| {rows:,} | peer | {label} | {_fmt(run.get("inner_s"))} | '
            f'{_fmt(run["cpu_s"])} | '
            f'{_fmt(_rate(rows, run.get("inner_s")), ",.0f")} | '
            f'{_fmt(run["peak_tree_mb"], ".0f")} |')
  return '\n'.join(lines)


def targets(results: List[Dict[str, object]]) -> str:
  by_rows = {r['rows']: r for r in results}
  lines = ['| target | measured | verdict |', '|---|---|---|']
  one = by_rows.get(1_000_000, {}).get('score')
  if one and one['rc'] == 0:
    lines.append(f'| 1M end to end (score run) <= {TARGET_1M_SECONDS:.0f} s '
                 f'| {one["wall_s"]:.1f} s | '
                 f'{_verdict(one["wall_s"] <= TARGET_1M_SECONDS)} |')
    lines.append(f'| 1M peak RSS (process tree) <= {TARGET_1M_MB:.0f} MB | '
                 f'{one["peak_tree_mb"]:.0f} MB | '
                 f'{_verdict(one["peak_tree_mb"] <= TARGET_1M_MB)} |')
  else:
    lines.append(f'| 1M end to end <= {TARGET_1M_SECONDS:.0f} s, <= '
                 f'{TARGET_1M_MB:.0f} MB | not run | n/a |')
  for rows, r in sorted(by_rows.items()):
    p = r.get('peers')
    if not p:
      continue
    tf_s, ours = p['tfdv_csv'].get('inner_s'), p['our_stats'].get('inner_s')
    if tf_s and ours:
      lines.append(f'| {rows:,}: statistics >= {TARGET_STATS_SPEEDUP:.0f}x '
                   f'faster than TFDV CSV | TFDV {tf_s:.1f} s / ours '
                   f'{ours:.1f} s = {tf_s / ours:.2f}x | '
                   f'{_verdict(tf_s / ours >= TARGET_STATS_SPEEDUP)} |')
    check = p['pandas'].get('result', {}).get('check')
    lines.append(f'| {rows:,}: pandas peer == pipeline features | {check} | '
                 f'{_verdict(None if "n/a" in str(check) else check == "OK")}'
                 ' |')
  four = by_rows.get(BIG, {}).get('score')
  if one and four and one['rc'] == 0 and four['rc'] == 0:
    ratio = four['wall_s'] / one['wall_s']
    lines.append(f'| 4M <= {TARGET_4M_RATIO}x the 1M time | {ratio:.2f}x | '
                 f'{_verdict(ratio <= TARGET_4M_RATIO)} |')
  else:
    lines.append(f'| 4M <= {TARGET_4M_RATIO}x the 1M time | not run | n/a |')
  return '\n'.join(lines)


def breakdown_table(rows: int, steps: List[Dict[str, object]]) -> str:
  lines = [f'Ingest job built up step by step ({rows:,} rows; each a fresh '
           'process; seconds inside p.run(), imports excluded):', '',
           '| up to | wall s | added by this step | CPU s (process) | '
           'peak RSS MB |', '|---|---:|---:|---:|---:|']
  base = {'x-aggregates': 'statistics', 'x-writes': 'x-aggregates'}
  seconds = {s['step']: s.get('inner_s') for s in steps}
  previous = None
  for s in steps:
    sec = s.get('inner_s')
    before = seconds.get(base[s['step']]) if s['step'] in base else previous
    name = s['step']
    if name in base:
      name = (f'{name} (experiment; vs {base[name]}; compare with '
              f'{name[2:]})')
    lines.append(f'| {name} | {_fmt(sec)} | '
                 f'{_fmt(None if sec is None else sec - (before or 0.0))} | '
                 f'{_fmt(s["cpu_s"])} | {_fmt(s["peak_tree_mb"], ".0f")} |')
    previous = sec
  return '\n'.join(lines)


# Main ------------------------------------------------------------------------------
def bench_size(seed: int, rows: int, args) -> Dict[str, object]:
  print(f'== {rows:,} rows (load {load_average()})', file=sys.stderr,
        flush=True)
  data = ensure_data(seed, rows)
  logs = os.path.join(data, 'logs')
  result = {'rows': rows, 'seed': seed, 'data': data}
  with open(os.path.join(data, 'meta.json')) as f:
    result['generated'] = json.load(f)
  if args.peers_only:
    result['peers'] = peers(data, None, logs)
    return result
  model = ensure_model(data)
  score_dir = os.path.join(data, 'run_score')
  result['score'] = run_measured(batch_cmd(data, score_dir, model),
                                 os.path.join(logs, 'score.log'),
                                 'score run (--model_dir)')
  if not args.skip_full:
    result['full'] = run_measured(batch_cmd(data, os.path.join(
        data, 'run_full')), os.path.join(logs, 'full.log'),
                                  'full run (transform + train)')
  if not args.skip_peers and result['score']['rc'] == 0:
    result['peers'] = peers(data, os.path.join(score_dir, 'features'), logs)
  if args.breakdown:
    result['breakdown'] = breakdown(data, logs)
  if args.profile:
    result['profile'] = profile(data, logs, model)
  return result


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='bench.run',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--rows', type=int, nargs='+', default=None,
                 help='sizes (default 100000 1000000)')
  p.add_argument('--big', action='store_true', help='add 4,000,000 rows')
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--skip-full', action='store_true',
                 help='only the scoring run (no transform + train)')
  p.add_argument('--skip-peers', action='store_true')
  p.add_argument('--peers-only', action='store_true',
                 help='no pipeline runs: the peers alone (the statistics '
                 'peers then read the pandas feature table)')
  p.add_argument('--breakdown', action='store_true',
                 help='also time the ingest job built up step by step')
  p.add_argument('--profile', action='store_true',
                 help='also cProfile the ingest job and the Predict stage')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='set in every measured process, e.g. '
                 'OMP_NUM_THREADS=1 (repeatable)')
  p.add_argument('--report', default=None, metavar='RESULTS_JSON',
                 help='only print the tables of a saved results file')
  p.add_argument('--keep-going', action='store_true',
                 help='continue with the next size after a failed run')
  # Internal entry points (run in subprocesses).
  p.add_argument('--_generate', default=None, help=argparse.SUPPRESS)
  p.add_argument('--_tfdv_csv', nargs=2, default=None, help=argparse.SUPPRESS)
  p.add_argument('--_our_stats', nargs=2, default=None,
                 help=argparse.SUPPRESS)
  p.add_argument('--_our_stats_arrow', nargs=2, default=None,
                 help=argparse.SUPPRESS)
  p.add_argument('--_stats_in_memory', nargs=2, default=None,
                 help=argparse.SUPPRESS)
  p.add_argument('--_predict_only', nargs=3, default=None,
                 help=argparse.SUPPRESS)
  p.add_argument('--_ingest_prefix', nargs=3, default=None,
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args._generate:
    _generate(args._generate, args.seed, args.rows[0])
    return 0
  if args._tfdv_csv:
    _tfdv_csv(*args._tfdv_csv)
    return 0
  if args._our_stats:
    _our_stats(*args._our_stats, arrow_direct=False)
    return 0
  if args._our_stats_arrow:
    _our_stats(*args._our_stats_arrow, arrow_direct=True)
    return 0
  if args._stats_in_memory:
    _stats_in_memory(*args._stats_in_memory)
    return 0
  if args._predict_only:
    _predict_only(*args._predict_only)
    return 0
  if args._ingest_prefix:
    step, input_path, output_dir = args._ingest_prefix
    _ingest_prefix(input_path, output_dir, step)
    return 0

  if args.report:
    with open(args.report) as f:
      saved = json.load(f)
    report(saved['results'])
    return 0

  for item in args.env:
    key, sep, value = item.partition('=')
    if not sep:
      p.error(f'--env {item}: use KEY=VALUE')
    EXTRA_ENV[key] = value
  sizes = list(args.rows or DEFAULT_SIZES)
  if args.big and BIG not in sizes:
    sizes.append(BIG)
  info = machine()
  print(f'machine: {info["nproc"]} CPUs, {info.get("memory_gb")} GB, '
        f'Python {info["python"]}, load {load_average()}', file=sys.stderr)
  results = []
  for rows in sizes:
    try:
      r = bench_size(args.seed, rows, args)
    except (RuntimeError, subprocess.CalledProcessError) as e:
      print(f'  {rows}: {e}', file=sys.stderr)
      if not args.keep_going:
        break
      continue
    results.append(r)
    if r.get('score') and r['score']['rc'] != 0 and not args.keep_going:
      break
  os.makedirs(os.path.join(CACHE, 'results'), exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = os.path.join(CACHE, 'results', f'{stamp}.json')
  with open(path, 'w') as f:
    json.dump({'machine': info, 'env': EXTRA_ENV, 'argv': sys.argv[1:],
               'results': results}, f, indent=1,
              default=str)
  report(results)
  print(f'\nload average at the end: {load_average()}; results: {path}')
  ok = all(r.get('score', {'rc': 0})['rc'] == 0 and r.get('peers', {}).get(
      'pandas', {}).get('result', {}).get('check', 'OK') in (
          'OK', 'n/a (no pipeline run)') for r in results)
  return 0 if ok and results else 1


def estimate(results: List[Dict[str, object]], rows: int = 1_000_000
             ) -> Optional[str]:
  """Linear extrapolation of the largest measured score run to `rows`:
  startup stays, every stage scales with the row count."""
  done = [r for r in results if r.get('score') and r['score']['rc'] == 0
          and r['rows'] < rows]
  if not done:
    return None
  r = max(done, key=lambda x: x['rows'])
  run = r['score']
  staged = sum(s['seconds'] or 0.0 for s in run['stages'])
  scale = rows / r['rows']
  guess = run['wall_s'] - staged + staged * scale
  full = r.get('full')
  text = (f'linear estimate for {rows:,} rows from {r["rows"]:,}: score run '
          f'~{guess:.0f} s')
  if full and full['rc'] == 0:
    fstaged = sum(s['seconds'] or 0.0 for s in full['stages'])
    text += (f', full run ~{full["wall_s"] - fstaged + fstaged * scale:.0f}'
             ' s')
  return text


def report(results: List[Dict[str, object]]):
  print()
  print(table(results))
  print()
  print(targets(results))
  guess = estimate(results)
  if guess:
    print(f'\n{guess}')
  for r in results:
    if r.get('breakdown'):
      print()
      print(breakdown_table(r['rows'], r['breakdown']))
    if r.get('profile'):
      print(f'\nprofiles at {r["rows"]:,} rows: ' + ', '.join(
          r['profile'] if isinstance(r['profile'], list) else [r['profile']]))


if __name__ == '__main__':
  sys.exit(main())
