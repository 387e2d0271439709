"""Benchmark of the batch pipeline (`pipelines.batch`) against its targets.

    python -m bench.run                      # 100k and 1M rows
    python -m bench.run --big                # adds 4M
    python -m bench.run --rows 20000         # a quick check
    python -m bench.run --rows 100000 --profile
    python -m bench.run --report bench/.cache/results/<stamp>.json

For every size it
  1. generates the data once per (seed, size) with pipelines.generate,
     cached under bench/.cache/s<seed>-n<rows>/ as JSON lines (the
     pipeline's input) and CSV (for TFDV's own CSV path);
  2. trains a model once per cache (an unmeasured full run, kept in
     train/), then measures, each as a subprocess of `pipelines.batch` on
     DirectRunner (every element a pyarrow RecordBatch):
       score  --model_dir <trained model>: ingest, features, aggregates,
              statistics + validation, predict (one process);
       multi  the score run with --direct_running_mode multi_processing
              --direct_num_workers 2 (Beam's flags, passed through);
       full   the score run's stages plus tf.Transform and training;
     stage timings come from the '== <stage>' / 'done in X s' lines on
     stderr; memory is the peak resident set of the whole process tree
     (VmRSS summed over the process and its descendants, polled every
     0.2 s from /proc; shared pages counted once per process), per stage
     and overall, plus the largest single process (wait4 ru_maxrss);
  3. runs the peers on the same rows, each timed inside its own process
     (imports excluded): TFDV's `generate_statistics_from_csv` on the CSV;
     our statistics stage alone (the score run's features Parquet ->
     ReadFeatureRows -> GenerateFeatureStatistics -> WriteStatistics); and
     bench.pandas_features (single-process pandas history features), whose
     table is compared with the pipeline's features Parquet (OK/MISMATCH);
  4. prints one table (size, run, stage, wall s, CPU s, records/s, peak RSS
     MB), the peers, and the targets of the issue "Columnar core" with
     PASS/MISS (see `targets`).

Results are also written as JSON under bench/.cache/results/
(`--report <file>` prints their tables again).
Flags: --skip-multi, --skip-full, --skip-peers, --peers-only (no pipeline
runs), --retrain (train the cached model again), --keep-going, --seed,
--env KEY=VALUE (e.g. OMP_NUM_THREADS=1, set in every measured process),
--profile (cProfile of a whole score run, in a separate output folder; the
report goes to the cache's logs/).
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
from typing import Dict, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
CACHE = os.path.join(BENCH_DIR, '.cache')
PYTHON = sys.executable
DEFAULT_SIZES = (100_000, 1_000_000)
BIG = 4_000_000
POLL_S = 0.2
EXTRA_ENV: Dict[str, str] = {}   # --env KEY=VALUE, for every measured process
# The multi run: Beam's own DirectRunner flags, passed through untouched.
MULTI_FLAGS = ('--direct_running_mode', 'multi_processing',
               '--direct_num_workers', '2')

# Targets of the issue "Columnar core" (DirectRunner, generated
# transactions). Absolute targets hold at TARGET_ROWS; the scaling targets
# compare BIG with TARGET_ROWS.
TARGET_ROWS = 1_000_000
TARGET_SCORE_SECONDS = 60.0          # score run, wall
TARGET_SCORE_PEAK_MB = 2048.0        # score run, peak RSS of the tree
TARGET_FULL_SECONDS = 120.0          # full run (+ tf.Transform, training)
TARGET_SCORE_VS_TFDV_CSV = 1.0       # score run s / TFDV CSV stats s, at most
TARGET_STATS_SPEEDUP = 10.0          # TFDV CSV stats s / our stats s, at least
TARGET_BIG_TIME_RATIO = 4.4          # BIG score s / TARGET_ROWS score s
TARGET_BIG_MEMORY_RATIO = 2.0        # BIG score peak / TARGET_ROWS peak
# (and: the multi run faster than the score run; pandas peer == pipeline)

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
        'log': self.log_path, 'json': _last_json(self.stdout),
    }


def _last_json(text: str) -> Optional[Dict[str, object]]:
  """The last line of `text` that is a JSON object (what the peers print),
  or None."""
  for line in reversed(text.splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except ValueError:
        return None
  return None


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
  from pipelines.synthetic.transactions import generate_transactions, write_records
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


def batch_cmd(data: str, output_dir: str, model_dir: Optional[str] = None,
              extra: Sequence[str] = ()) -> List[str]:
  """`pipelines.batch` on this cache's JSON lines; `extra` flags (Beam's
  own, e.g. MULTI_FLAGS) are appended untouched."""
  cmd = [PYTHON, '-m', 'pipelines.batch', '--runner', 'DirectRunner',
         '--input', os.path.join(data, 'transactions.jsonl'),
         '--output_dir', output_dir, '--no-fail_on_anomalies']
  if model_dir:
    cmd += ['--model_dir', model_dir]
  return cmd + list(extra)


def ensure_model(data: str, retrain: bool = False) -> str:
  """A model trained on this cache's data (once, or again with
  `retrain`, e.g. after the model format changed): train/model."""
  train_dir = os.path.join(data, 'train')
  model = os.path.join(train_dir, 'model')
  if retrain or not os.path.exists(os.path.join(model, 'metadata.json')):
    result = run_measured(batch_cmd(data, train_dir),
                          os.path.join(data, 'logs', 'train.log'),
                          'training a model (not measured)')
    if result['rc'] != 0:
      raise RuntimeError(f'training run failed: see {result["log"]}')
  return model


# Peers -----------------------------------------------------------------------------
def _tfdv_csv(csv_path: str, output: str):
  """(In a subprocess) TFDV's own CSV path; prints the seconds it took."""
  from pipelines.base.quiet import import_tfdv
  tfdv = import_tfdv()
  began = time.monotonic()
  tfdv.generate_statistics_from_csv(data_location=csv_path,
                                    output_path=output)
  print(json.dumps({'seconds': time.monotonic() - began}))


def _our_stats(features_dir: str, output: str):
  """(In a subprocess) our statistics stage alone, on a features table:
  Parquet -> RecordBatches -> TFXIO batches -> tfdv.GenerateStatistics ->
  stats.pb, the transforms the ingest job uses; prints its seconds."""
  import pipelines.base.quiet  # noqa: F401
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from transforms.feature_rows import ReadFeatureRows
  from schemas.dataset import load_dataset
  from transforms.statistics import GenerateFeatureStatistics, WriteStatistics
  dataset = load_dataset()
  began = time.monotonic()
  with beam.Pipeline(options=PipelineOptions(['--runner',
                                              'DirectRunner'])) as p:
    (p
     | 'ReadFeatures' >> ReadFeatureRows(os.path.join(features_dir,
                                                      '*.parquet'))
     | 'FeatureStatistics' >> GenerateFeatureStatistics(dataset)
     | 'WriteStatistics' >> WriteStatistics(output))
  print(json.dumps({'seconds': time.monotonic() - began}))


def peers(data: str, features_dir: Optional[str], logs: str
          ) -> Dict[str, object]:
  """The peers; without `features_dir` (no pipeline run, --peers-only)
  the pandas table is written and the statistics peer reads it instead."""
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
  result['result'] = result['json'] or {'check': 'ERROR'}
  if '--compare' not in cmd:
    result['result']['check'] = 'n/a (no pipeline run)'
    result['result'].pop('write_s', None)
  out['pandas'] = result
  tmp = os.path.join(data, 'peers')
  os.makedirs(tmp, exist_ok=True)
  for name, args in (
      ('tfdv_csv', ['--_tfdv_csv', os.path.join(data, 'transactions.csv'),
                    os.path.join(tmp, 'tfdv_csv.stats')]),
      ('our_stats', ['--_our_stats', features_dir,
                     os.path.join(tmp, 'ours.stats.pb')])):
    result = run_measured([PYTHON, '-m', 'bench.run'] + args,
                          os.path.join(logs, f'{name}.log'), name)
    result['inner_s'] = (result['json'] or {}).get('seconds')
    out[name] = result
  return out


# Profile -----------------------------------------------------------------------------
def profile(data: str, logs: str, model: str, top: int = 60) -> str:
  """cProfile of a whole score run (DirectRunner runs the bundles in the
  profiled thread); returns the text report's path."""
  import io
  import pstats
  stats_file = os.path.join(data, 'score.prof')
  cmd = batch_cmd(data, os.path.join(data, 'run_profile'), model)
  cmd[1:1] = ['-m', 'cProfile', '-o', stats_file]
  result = run_measured(cmd, os.path.join(logs, 'profile-score.log'),
                        'cProfile of the score run')
  if result['rc'] != 0 or not os.path.exists(stats_file):
    return f'failed (see {result["log"]})'
  text = io.StringIO()
  stats = pstats.Stats(stats_file, stream=text)
  stats.sort_stats('cumulative').print_stats(top)
  stats.sort_stats('tottime').print_stats(top)
  report = os.path.join(logs, 'score-profile.txt')
  with open(report, 'w') as f:
    f.write(text.getvalue())
  return report


# Report ------------------------------------------------------------------------------
RUNS = {'score': 'score', 'multi': 'multi (2 workers)', 'full': 'full'}


def _fmt(value, spec='.1f', missing='-'):
  return missing if value is None else format(value, spec)


def _rate(rows, seconds):
  return None if not seconds else rows / seconds


def _ok(run: Optional[Dict[str, object]]) -> Optional[Dict[str, object]]:
  """The run if it ran and succeeded."""
  return run if run and run['rc'] == 0 else None


def _state(run: Optional[Dict[str, object]]) -> str:
  return 'not run' if not run else f'failed rc={run["rc"]}'


def table(results: List[Dict[str, object]]) -> str:
  lines = ['| size | run | stage | wall s | CPU s | records/s | '
           'peak RSS MB |', '|---:|---|---|---:|---:|---:|---:|']
  for r in results:
    rows = r['rows']
    for kind, label in RUNS.items():
      run = r.get(kind)
      if not run:
        continue
      staged = 0.0
      for s in run['stages']:
        sec = s['seconds']
        staged += sec or 0.0
        lines.append(
            f'| {rows:,} | {label} | {s["stage"]} | {_fmt(sec)} | '
            f'{_fmt(s.get("cpu_s"))} | '
            f'{_fmt(_rate(rows, sec), ",.0f")} | '
            f'{_fmt(run["stage_peak_mb"].get(s["stage"]), ".0f")} |')
      lines.append(f'| {rows:,} | {label} | startup + exit (imports, '
                   f'checks) | {_fmt(run["wall_s"] - staged)} | | | '
                   f'{_fmt(run["stage_peak_mb"].get("startup"), ".0f")} |')
      lines.append(
          f'| {rows:,} | {label} | **total** | **{_fmt(run["wall_s"])}** | '
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
          ('our_stats', 'ours: features Parquet -> ReadFeatureRows -> '
           'GenerateFeatureStatistics -> stats.pb (29 cols)')):
        run = p.get(name)
        if not run:
          continue
        lines.append(
            f'| {rows:,} | peer | {label} | {_fmt(run.get("inner_s"))} | '
            f'{_fmt(run["cpu_s"])} | '
            f'{_fmt(_rate(rows, run.get("inner_s")), ",.0f")} | '
            f'{_fmt(run["peak_tree_mb"], ".0f")} |')
  return '\n'.join(lines)


def _size_targets(r: Dict[str, object]):
  """(target, measured, ok) of the targets that compare runs of one size;
  ok is None where a run is missing."""
  score, multi = _ok(r.get('score')), _ok(r.get('multi'))
  p = r.get('peers') or {}
  tfdv_s = (p.get('tfdv_csv') or {}).get('inner_s')
  ours_s = (p.get('our_stats') or {}).get('inner_s')
  if score and tfdv_s:
    ratio = score['wall_s'] / tfdv_s
    yield ('score run no slower than TFDV generate_statistics_from_csv',
           f'score {score["wall_s"]:.1f} s / TFDV {tfdv_s:.1f} s = '
           f'{ratio:.2f}x', ratio <= TARGET_SCORE_VS_TFDV_CSV)
  else:
    yield ('score run no slower than TFDV generate_statistics_from_csv',
           _state(r.get('score')) if not score else 'no TFDV peer', None)
  if tfdv_s and ours_s:
    speedup = tfdv_s / ours_s
    yield (f'statistics >= {TARGET_STATS_SPEEDUP:.0f}x faster than TFDV CSV',
           f'TFDV {tfdv_s:.1f} s / ours {ours_s:.1f} s = {speedup:.2f}x',
           speedup >= TARGET_STATS_SPEEDUP)
  else:
    yield (f'statistics >= {TARGET_STATS_SPEEDUP:.0f}x faster than TFDV CSV',
           'no peers', None)
  if score and multi:
    yield ('multi_processing (2 workers) faster than the score run',
           f'multi {multi["wall_s"]:.1f} s vs score {score["wall_s"]:.1f} s',
           multi['wall_s'] < score['wall_s'])
  else:
    yield ('multi_processing (2 workers) faster than the score run',
           _state(r.get('multi')) if score else _state(r.get('score')), None)
  check = (p.get('pandas') or {}).get('result', {}).get('check')
  yield ('pandas peer == pipeline features', str(check or 'no peers'),
         None if not check or 'n/a' in check else check == 'OK')


def _verdict(ok: Optional[bool]) -> str:
  return 'n/a' if ok is None else ('PASS' if ok else 'MISS')


def targets(results: List[Dict[str, object]]) -> str:
  """The targets with PASS/MISS. Absolute ones are at TARGET_ROWS; the
  comparisons within a size are shown for every size, their verdict in
  parentheses (indicative) away from TARGET_ROWS, except the pandas check,
  which is exact at any size."""
  by_rows = {r['rows']: r for r in results}
  at = by_rows.get(TARGET_ROWS, {})
  n = f'{TARGET_ROWS / 1e6:g}M'
  lines = ['| target | measured | verdict |', '|---|---|---|']
  score, full = _ok(at.get('score')), _ok(at.get('full'))
  if score:
    lines.append(f'| {n} score run <= {TARGET_SCORE_SECONDS:.0f} s wall | '
                 f'{score["wall_s"]:.1f} s | '
                 f'{_verdict(score["wall_s"] <= TARGET_SCORE_SECONDS)} |')
    lines.append(f'| {n} score run peak RSS (process tree) <= '
                 f'{TARGET_SCORE_PEAK_MB:.0f} MB | '
                 f'{score["peak_tree_mb"]:.0f} MB | '
                 f'{_verdict(score["peak_tree_mb"] <= TARGET_SCORE_PEAK_MB)}'
                 ' |')
  else:
    lines.append(f'| {n} score run <= {TARGET_SCORE_SECONDS:.0f} s, <= '
                 f'{TARGET_SCORE_PEAK_MB:.0f} MB | '
                 f'{_state(at.get("score"))} | n/a |')
  lines.append(
      f'| {n} full run (+ tf.Transform, training) <= '
      f'{TARGET_FULL_SECONDS:.0f} s | '
      + (f'{full["wall_s"]:.1f} s | '
         f'{_verdict(full["wall_s"] <= TARGET_FULL_SECONDS)} |' if full
         else f'{_state(at.get("full"))} | n/a |'))
  big = _ok(by_rows.get(BIG, {}).get('score'))
  b = f'{BIG / 1e6:g}M'
  if score and big:
    time_ratio = big['wall_s'] / score['wall_s']
    memory_ratio = big['peak_tree_mb'] / score['peak_tree_mb']
    lines.append(f'| {b} score run <= {TARGET_BIG_TIME_RATIO}x the {n} time '
                 f'| {time_ratio:.2f}x | '
                 f'{_verdict(time_ratio <= TARGET_BIG_TIME_RATIO)} |')
    lines.append(f'| {b} score run <= {TARGET_BIG_MEMORY_RATIO:g}x the {n} '
                 f'peak RSS | {memory_ratio:.2f}x | '
                 f'{_verdict(memory_ratio <= TARGET_BIG_MEMORY_RATIO)} |')
  else:
    lines.append(f'| {b} score run <= {TARGET_BIG_TIME_RATIO}x the {n} time,'
                 f' <= {TARGET_BIG_MEMORY_RATIO:g}x its peak RSS | '
                 f'needs both sizes | n/a |')
  indicative = False
  for rows, r in sorted(by_rows.items()):
    for target, measured, ok in _size_targets(r):
      verdict = _verdict(ok)
      if (rows != TARGET_ROWS and ok is not None
          and not target.startswith('pandas')):
        verdict, indicative = f'({verdict})', True
      lines.append(f'| {rows:,}: {target} | {measured} | {verdict} |')
  if indicative:
    lines.append(f'\n(verdict): measured at a size other than {n}, where '
                 'the target is set; indicative only.')
  return '\n'.join(lines)


def estimate(results: List[Dict[str, object]], rows: int = TARGET_ROWS
             ) -> Optional[str]:
  """Linear extrapolation of the largest measured score run to `rows`:
  startup stays, every stage scales with the row count."""
  done = [r for r in results if _ok(r.get('score')) and r['rows'] < rows]
  if not done:
    return None
  r = max(done, key=lambda x: x['rows'])
  scale = rows / r['rows']

  def guess(run):
    staged = sum(s['seconds'] or 0.0 for s in run['stages'])
    return run['wall_s'] - staged + staged * scale

  text = (f'linear estimate for {rows:,} rows from {r["rows"]:,}: score run '
          f'~{guess(r["score"]):.0f} s')
  if _ok(r.get('full')):
    text += f', full run ~{guess(r["full"]):.0f} s'
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
    if r.get('profile'):
      # A list in results saved before the profile became one report.
      print(f'\nprofile at {r["rows"]:,} rows: ' + ', '.join(
          r['profile'] if isinstance(r['profile'], list) else [r['profile']]))


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
  model = ensure_model(data, args.retrain)
  score_dir = os.path.join(data, 'run_score')
  result['score'] = run_measured(batch_cmd(data, score_dir, model),
                                 os.path.join(logs, 'score.log'),
                                 'score run (--model_dir)')
  if not args.skip_multi:
    result['multi'] = run_measured(
        batch_cmd(data, os.path.join(data, 'run_multi'), model,
                  MULTI_FLAGS),
        os.path.join(logs, 'multi.log'), 'score run, multi_processing x2')
  if not args.skip_full:
    result['full'] = run_measured(batch_cmd(data, os.path.join(
        data, 'run_full')), os.path.join(logs, 'full.log'),
                                  'full run (transform + train)')
  if not args.skip_peers and result['score']['rc'] == 0:
    result['peers'] = peers(data, os.path.join(score_dir, 'features'), logs)
  if args.profile:
    result['profile'] = profile(data, logs, model)
  return result


def _succeeded(r: Dict[str, object]) -> bool:
  """Every pipeline run of a size ended with rc 0 and the pandas check
  did not fail."""
  runs_ok = all(r[kind]['rc'] == 0 for kind in RUNS if r.get(kind))
  check = r.get('peers', {}).get('pandas', {}).get('result', {}).get(
      'check', 'OK')
  return runs_ok and (check == 'OK' or check.startswith('n/a'))


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(
      prog='bench.run', description=__doc__.split('\n\n')[0],
      epilog='Measures the score, multi_processing and full runs of '
      'pipelines.batch and the peers; see the module docstring.')
  p.add_argument('--rows', type=int, nargs='+', default=None,
                 help='sizes (default 100000 1000000)')
  p.add_argument('--big', action='store_true', help='add 4,000,000 rows')
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--skip-multi', action='store_true',
                 help='no score run with ' + ' '.join(MULTI_FLAGS))
  p.add_argument('--skip-full', action='store_true',
                 help='no full run (tf.Transform + training)')
  p.add_argument('--skip-peers', action='store_true',
                 help='no TFDV CSV, statistics-alone or pandas peers')
  p.add_argument('--peers-only', action='store_true',
                 help='no pipeline runs: the peers alone (the statistics '
                 'peer then reads the pandas feature table)')
  p.add_argument('--retrain', action='store_true',
                 help="train each size's cached model again (after a change "
                 'to training or the model format)')
  p.add_argument('--profile', action='store_true',
                 help='also cProfile a whole score run')
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
  args = p.parse_args(argv)

  if args._generate:
    _generate(args._generate, args.seed, args.rows[0])
    return 0
  if args._tfdv_csv:
    _tfdv_csv(*args._tfdv_csv)
    return 0
  if args._our_stats:
    _our_stats(*args._our_stats)
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
               'results': results}, f, indent=1, default=str)
  report(results)
  print(f'\nload average at the end: {load_average()}; results: {path}')
  return 0 if results and all(_succeeded(r) for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
