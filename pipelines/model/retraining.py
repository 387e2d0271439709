"""Retraining on a policy: decide, train a challenger, compare, promote
(the command is `pipelines.retrain`; `decide` is the whole decision).

Reads the latest scoring run's reports (`<run_dir>/validation/drift.json`,
`skew.json`) and its monitoring report (`--monitoring`, by default
`<run_dir>/monitoring/report.json`), and asks the policy (a small YAML,
`load_policy`) whether any trigger fires. When one does:

  1. a challenger is trained on --input (the latest labelled window) by
     the batch job with --registry, which registers it as a candidate
     (or --challenger names a candidate already registered); the command
     passes the batch job's `run` in (`decide(args, run_batch)`), so this
     library never imports a command;
  2. champion and challenger score the same rows: the run's feature rows
     (`<run_dir>/features/`) that have a label (--labels, else the rows'
     own label column) and whose event time is after both models'
     training data (each model's `train_time_range`), so neither model is
     judged on rows it learned from; both on the driver with
     `transforms.inference.predict_table`;
  3. the challenger is promoted (`Registry.promote`) only when its metric
     beats the champion's by at least `promote_margin` on at least
     `min_eval_rows` rows with `min_eval_positives` positives.

Every decision, "no retrain needed" included, is written with its reasons
to `<output_dir>/retrain/decision.json` and appended to
`<registry>/decisions.jsonl`. Times come from --reference_time, else the
latest event time of the run's feature rows, never from the clock.
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import
from pipelines.base.errors import UsageError
from pipelines.base.safe_yaml import YamlError, load_yaml

import contextlib
import io
import json
import math
from typing import Any, Callable, Dict, List, Optional

from apache_beam.io.filesystems import FileSystems
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.model import monitoring as monitor
from pipelines.outputs import files
from pipelines.model.registry import CHAMPION, Registry, RegistryError
from schemas.dataset import Dataset, load_dataset
from transforms import arrow
from transforms.common import micros_to_rfc3339
from transforms.inference import (TransformedSklearnModelHandler,
                                  predict_table)
from transforms.parse import rfc3339_to_micros

RETRAIN = 'retrain'
DECISION_FILE = 'decision.json'
DECISIONS_LOG = 'decisions.jsonl'
LOG_FILE = 'retrain.log'
CHALLENGER_RUN = 'challenger'
METRICS = ('roc_auc', 'pr_auc')

# The policy: every key optional; at least one trigger.
TRIGGERS = {
    'max_auc_drop': float,          # monitored metric below the eval one by more
    'max_drifted_features': int,    # more features than this drifted
    'max_skewed_features': int,     # more features than this skewed
    'max_score_psi': float,         # score PSI (monitoring) above this
}
SETTINGS = {
    'metric': str, 'promote_margin': float, 'min_eval_rows': int,
    'min_eval_positives': int,
}
DEFAULTS = {'metric': 'roc_auc', 'promote_margin': 0.0, 'min_eval_rows': 100,
            'min_eval_positives': 5}


class RetrainError(UsageError, ValueError):
  """Bad flags, policy or inputs (exit 2)."""


# Policy ---------------------------------------------------------------------
def load_policy(path: str) -> Dict[str, Any]:
  """The policy YAML, checked, with defaults filled in."""
  try:
    with FileSystems.open(path) as f:
      # The project's YAML loader: duplicate keys and alias bombs refused.
      raw = load_yaml(f.read(), f'--policy {path}')
  except OSError as e:
    raise RetrainError(f'--policy {path}: cannot read it: '
                       f'{" ".join(str(e).split())}') from None
  except YamlError as e:
    raise RetrainError(str(e)) from None
  if not isinstance(raw, dict):
    raise RetrainError(f'--policy {path}: must be a mapping of settings')
  known = {**TRIGGERS, **SETTINGS}
  policy = dict(DEFAULTS)
  for key, value in raw.items():
    if key not in known:
      raise RetrainError(f'--policy {path}: unknown key {key!r}; use '
                         f'{", ".join(sorted(known))}')
    kind = known[key]
    if kind is float and isinstance(value, int) and not isinstance(
        value, bool):
      value = float(value)
    # nan compares false with every limit (a trigger that never fires) and
    # inf is never exceeded; both would also be written as non-standard
    # JSON (NaN, Infinity) in decisions.jsonl.
    if not isinstance(value, kind) or isinstance(value, bool) or (
        kind is not str and value < 0):
      raise RetrainError(f'--policy {path}: {key} must be a non-negative '
                         f'{"number" if kind is float else kind.__name__}')
    if kind is float and not math.isfinite(value):
      raise RetrainError(f'--policy {path}: {key} must be a finite number, '
                         f'not {value!r}')
    policy[key] = value
  if policy['metric'] not in METRICS:
    raise RetrainError(f'--policy {path}: metric must be one of '
                       f'{", ".join(METRICS)}')
  if not any(k in policy for k in TRIGGERS):
    raise RetrainError(f'--policy {path}: no trigger, so it never fires; '
                       f'set one of {", ".join(TRIGGERS)}')
  return dict(sorted(policy.items()))


# Reports and triggers -------------------------------------------------------
def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not FileSystems.exists(path):
    return None
  try:
    return files.read_json(path)
  except ValueError as e:
    raise RetrainError(f'{path} is not valid JSON: {e}') from None


def _trigger(name, limit, value, source, detail=None, note=None):
  if value is not None and not math.isfinite(value):
    # A report's nan (or inf) is no measurement: not fired, said why; its
    # detail (which holds it) is left out of the strict-JSON decision.
    note = f'{name}: the report holds {value!r}, not a number'
    value, detail = None, None
  fired = value is not None and value > limit
  out = {'trigger': name, 'limit': limit, 'value': value, 'fired': fired,
         'source': source}
  if detail is not None:
    out['detail'] = detail
  if note:
    out['note'] = note
  return out


def triggers(policy: Dict[str, Any], drift: Optional[Dict[str, Any]],
             skew: Optional[Dict[str, Any]],
             monitoring: Optional[Dict[str, Any]],
             champion: Dict[str, Any], sources: Dict[str, str]
             ) -> List[Dict[str, Any]]:
  """Each trigger of the policy: {trigger, limit, value, fired, source,
  detail?, note?}; value None (not fired) when its report is missing."""
  out = []
  for key, report, kind in (('max_drifted_features', drift, 'drift'),
                            ('max_skewed_features', skew, 'skew')):
    if key in policy:
      names = report['drifted'] if report else None
      out.append(_trigger(
          key, policy[key], len(names) if report else None, sources[kind],
          detail=names, note=None if report else f'no {kind} report'))
  version = champion['version']
  note = None
  if monitoring is None:
    note = 'no monitoring report'
  elif monitoring['model']['version'] != version:
    note = (f'the monitoring report is of model '
            f'{monitoring["model"]["version"]}, the champion is {version}')
  usable = monitoring if note is None else None
  if 'max_auc_drop' in policy:
    metric = policy['metric']
    drop, detail, why = None, None, note
    if usable:
      now = (usable['metrics'] or {}).get(metric)
      then = usable['eval_metrics'].get(metric)
      if now is None or then is None:
        why = f'{metric} undefined in the monitoring report'
      else:
        drop = then - now
        detail = {'eval': then, 'monitored': now}
    out.append(_trigger('max_auc_drop', policy['max_auc_drop'], drop,
                        sources['monitoring'], detail=detail, note=why))
  if 'max_score_psi' in policy:
    psi, why = None, note
    if usable:
      if usable.get('score_drift'):
        psi = usable['score_drift']['psi']
      else:
        why = 'no score drift in the monitoring report'
    out.append(_trigger('max_score_psi', policy['max_score_psi'], psi,
                        sources['monitoring'], note=why))
  return out


# Evaluation -----------------------------------------------------------------
def read_features(run_dir: str) -> pa.Table:
  """A run's feature rows (Parquet), timestamps as int64 epoch us."""
  pattern = files.pattern_in(files.join(run_dir, 'features'), '*.parquet')
  paths = sorted(m.path for m in FileSystems.match([pattern])[0]
                 .metadata_list)
  if not paths:
    raise RetrainError(f'--run_dir {run_dir} holds no feature rows '
                       f'({pattern})')
  tables = []
  for path in paths:
    with FileSystems.open(path) as f:
      table = pq.read_table(io.BytesIO(f.read()))
    tables.append(pa.Table.from_arrays(
        [arrow.flat_column(c) for c in table.columns],
        names=table.column_names))
  return pa.concat_tables(tables)


def labelled_rows(features: pa.Table, dataset: Dataset,
                  labels: Optional[pa.Table]) -> Dict[str, Any]:
  """The feature rows that have a label: from `labels` (monitor.read_labels:
  id, label; first copy of an id wins) when given, else the rows' own
  label column. Returns {table, labels, unlabelled}."""
  if labels is not None:
    ids = labels.column('id').combine_chunks()
    first, _ = monitor.first_copies(ids)
    ids = ids.filter(pa.array(first))
    values = labels.column(monitor.LABEL).combine_chunks().filter(
        pa.array(first))
    where = pc.index_in(features.column(dataset.id_field), value_set=ids)
    label = values.take(where)
  else:
    label = dataset.label_index(features.column(dataset.label_field))
  present = pa.array(np.asarray(label.is_valid().to_numpy(
      zero_copy_only=False), bool))
  return {'table': features.filter(present),
          'labels': label.filter(present).to_numpy().astype(np.int64),
          'unlabelled': features.num_rows - int(pc.sum(present).as_py() or 0)}


def _train_max(entry: Dict[str, Any]) -> Optional[int]:
  span = (entry.get('training') or {}).get('train_time_range') or {}
  return span.get('max_us')


def compare(rows: Dict[str, Any], dataset: Dataset, champion_dir: str,
            challenger_dir: str, champion: Dict[str, Any],
            challenger: Dict[str, Any], policy: Dict[str, Any]
            ) -> Dict[str, Any]:
  """Champion and challenger on the same labelled rows after both models'
  training data: {metric, rows, positives, excluded_rows, after, champion:
  {roc_auc, pr_auc}, challenger: {...}, difference, margin, enough}."""
  from sklearn.metrics import average_precision_score, roc_auc_score
  table, y = rows['table'], rows['labels']
  ts = dataset.timestamp_field
  after = None
  if ts:
    limits = [t for t in (_train_max(champion), _train_max(challenger))
              if t is not None]
    if limits:
      after = max(limits)
      keep = np.asarray(table.column(ts).to_numpy()
                        > after)
      table, y = table.filter(pa.array(keep)), y[keep]
  excluded = rows['table'].num_rows - table.num_rows
  positives = int(y.sum())
  enough = (len(y) >= policy['min_eval_rows'] and
            positives >= policy['min_eval_positives'] and
            positives < len(y))
  out = {'metric': policy['metric'], 'rows': len(y), 'positives': positives,
         'unlabelled_rows': rows['unlabelled'], 'excluded_rows': excluded,
         'after': micros_to_rfc3339(after) if after is not None else None,
         'margin': policy['promote_margin'], 'enough': enough,
         'champion': None, 'challenger': None, 'difference': None}
  if not enough:
    return out
  for name, model_dir in (('champion', champion_dir),
                          ('challenger', challenger_dir)):
    model = TransformedSklearnModelHandler(model_dir).load_model()
    scores = predict_table(model, table, dataset.id_field).column(
        'score').to_numpy()
    out[name] = {'roc_auc': float(roc_auc_score(y, scores)),
                 'pr_auc': float(average_precision_score(y, scores))}
  metric = policy['metric']
  out['difference'] = out['challenger'][metric] - out['champion'][metric]
  return out


# Challenger -----------------------------------------------------------------
# The batch job's run: argv -> its run summary (pipelines.batch.run).
RunBatch = Callable[[List[str]], Dict[str, Any]]


def train_challenger(args, registry: str, model_type: str,
                     output_dir: str, run_batch: RunBatch) -> Dict[str, Any]:
  """Runs the batch job (`run_batch`) on --input with --registry (it
  registers the model: a candidate unless it is the champion's version);
  its output goes to <output_dir>/retrain/challenger.log."""
  run_dir = files.join(output_dir, RETRAIN, CHALLENGER_RUN)
  argv = ['--input', args.input, '--output_dir', run_dir, '--registry',
          registry, '--schema', args.schema, '--model_type', model_type]
  if args.input_format:
    argv += ['--input_format', args.input_format]
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed), \
        contextlib.redirect_stderr(printed):
      summary = run_batch(argv + args.beam_args)
  finally:
    files.write_bytes(files.join(output_dir, RETRAIN, 'challenger.log'),
                   printed.getvalue().encode('utf-8'))
  return {'version': summary['registry']['registered'], 'run': run_dir}


# Decision -------------------------------------------------------------------
def _append(path: str, line: str):
  """Appends a line to a file, written whole to a temporary file and
  renamed over the old one (one upload on object stores)."""
  old = files.read_bytes(path) if FileSystems.exists(path) else b''
  files.write_atomic(path, old + line.encode('utf-8') + b'\n')


def _reference_time(args, features: Optional[pa.Table],
                    dataset: Dataset) -> Optional[str]:
  if args.reference_time:
    try:
      return micros_to_rfc3339(rfc3339_to_micros(args.reference_time))
    except ValueError as e:
      raise RetrainError(f'--reference_time: {e}') from None
  ts = dataset.timestamp_field
  if ts and features is not None and features.num_rows:
    return micros_to_rfc3339(int(pc.max(features.column(ts)).as_py()))
  return None


def decide(args, run_batch: RunBatch) -> Dict[str, Any]:
  """The decision of the command's parsed flags (see the module
  docstring); written to <output_dir>/retrain/decision.json and
  <registry>/decisions.jsonl. `run_batch` trains the challenger."""
  policy = load_policy(args.policy)
  dataset = load_dataset(args.schema)
  if dataset.task != 'binary':
    raise RetrainError(f'{dataset.name}: retraining supports binary labels; '
                       f'this label is {dataset.task}')
  registry = Registry(args.registry)
  champion = registry.champion()
  if champion is None:
    raise RetrainError(f'--registry {args.registry} has no champion: train '
                       'one with pipelines.batch --registry first')
  if not args.challenger and not args.input:
    raise RetrainError('--input (the window to train a challenger on) or '
                       '--challenger VERSION is required')
  if not FileSystems.exists(files.join(args.run_dir, 'run_summary.json')):
    raise RetrainError(f'--run_dir {args.run_dir} is not the output of a '
                       'batch run (no run_summary.json)')
  validation_dir = files.join(args.run_dir, 'validation')
  sources = {'drift': files.join(validation_dir, 'drift.json'),
             'skew': files.join(validation_dir, 'skew.json'),
             'monitoring': args.monitoring or files.join(
                 args.run_dir, monitor.MONITORING, monitor.REPORT_FILE)}
  if args.monitoring and not FileSystems.exists(args.monitoring):
    raise RetrainError(f'--monitoring {args.monitoring} does not exist')
  reports = {k: _read_json(v) for k, v in sources.items()}
  features = read_features(args.run_dir)
  at = _reference_time(args, features, dataset)
  labels = None
  if args.labels:
    try:
      labels, _, _ = monitor.read_labels(args.labels, dataset,
                                         args.labels_format)
    except monitor.MonitorError as e:
      raise RetrainError(str(e)) from None

  checked = triggers(policy, reports['drift'], reports['skew'],
                     reports['monitoring'], champion, sources)
  fired = [t for t in checked if t['fired']]
  decision = {
      'at': at,
      'policy': policy,
      'inputs': {'run_dir': args.run_dir, 'input': args.input,
                 'labels': args.labels,
                 'monitoring': sources['monitoring']
                 if reports['monitoring'] else None},
      'champion': {'version': champion['version'],
                   'model_type': champion.get('model_type')},
      'triggers': checked,
      'retrain': bool(fired),
      'challenger': None,
      'comparison': None,
  }
  reasons = []
  if not fired:
    decision.update(action='none', champion_after=champion['version'])
    reasons.append('no trigger fired: ' + '; '.join(
        trigger_text(t) for t in checked))
    return _finish(decision, reasons, args)
  reasons.append('fired: ' + '; '.join(trigger_text(t) for t in fired))

  if args.challenger:
    try:
      entry = registry.get(args.challenger)
    except RegistryError as e:
      raise RetrainError(f'--challenger: {e}') from None
    challenger = {'version': entry['version'], 'trained_here': False,
                  'run': None}
  else:
    model_type = args.model_type or champion.get('model_type') or 'gbt'
    challenger = dict(train_challenger(args, args.registry, model_type,
                                       args.output_dir, run_batch),
                      trained_here=True)
    entry = registry.get(challenger['version'])
    reasons.append(f'challenger {entry["version"]} ({model_type}) trained '
                   f'on {args.input}')
  challenger.update(model_type=entry.get('model_type'),
                    status=entry['status'])
  decision['challenger'] = challenger
  if entry['version'] == champion['version'] or entry['status'] == CHAMPION:
    reasons.append(f'the challenger is the champion {champion["version"]} '
                   '(same data and settings): nothing to promote')
    decision.update(action='kept_champion',
                    champion_after=champion['version'])
    return _finish(decision, reasons, args)

  comparison = compare(
      labelled_rows(features, dataset, labels), dataset,
      registry.model_dir(champion['version']),
      registry.model_dir(entry['version']), champion, entry, policy)
  decision['comparison'] = comparison
  metric = policy['metric']
  if comparison['after'] is None:
    reasons.append('the rows cannot be told apart from either model\'s '
                   'training rows (no event time): the comparison may '
                   'favour the model that learned them')
  if not comparison['enough']:
    reasons.append(
        f'too few labelled rows to compare after both models\' training '
        f'data: {comparison["rows"]} rows, {comparison["positives"]} '
        f'positive (the policy needs {policy["min_eval_rows"]} rows and '
        f'{policy["min_eval_positives"]} positives, and both classes): '
        f'champion kept')
    decision.update(action='kept_champion',
                    champion_after=champion['version'])
    return _finish(decision, reasons, args)
  text = (f'{metric} on {comparison["rows"]} rows: challenger '
          f'{comparison["challenger"][metric]:.4f}, champion '
          f'{comparison["champion"][metric]:.4f} '
          f'({comparison["difference"]:+.4f}, margin '
          f'{policy["promote_margin"]})')
  if comparison['difference'] >= policy['promote_margin']:
    reason = f'retrain: {text}'
    registry.promote(entry['version'], reason, at=at)
    reasons.append(f'promoted {entry["version"]}: {text}')
    decision.update(action='promoted', champion_after=entry['version'])
  else:
    reasons.append(f'champion kept: {text}')
    decision.update(action='kept_champion',
                    champion_after=champion['version'])
  return _finish(decision, reasons, args)


def trigger_text(t: Dict[str, Any]) -> str:
  if t['value'] is None:
    return f'{t["trigger"]} not evaluated ({t.get("note")})'
  value = (f'{t["value"]:.4f}' if isinstance(t['value'], float)
           else str(t['value']))
  detail = (f' ({", ".join(t["detail"])})' if isinstance(t.get('detail'),
                                                         list)
            and t['detail'] else '')
  return (f'{t["trigger"]} {value}{detail} '
          f'{">" if t["fired"] else "<="} {t["limit"]}')


def _finish(decision, reasons, args) -> Dict[str, Any]:
  decision['reasons'] = reasons
  decision = dict(sorted(decision.items()))
  # allow_nan=False: a value that is not finite fails here (exit 3, one
  # line) rather than writing NaN or Infinity, which no JSON reader takes.
  text = json.dumps(decision, sort_keys=True, allow_nan=False)
  files.write_bytes(files.join(args.output_dir, RETRAIN, DECISION_FILE),
                    json.dumps(decision, indent=2, sort_keys=True,
                               allow_nan=False).encode('utf-8'))
  registry = Registry(args.registry)
  with registry.lock():   # one appender at a time, as for the index
    _append(files.join(args.registry, DECISIONS_LOG), text)
  return decision
