"""The run report: one self-contained HTML page per batch run.

    python -m pipelines.report --output_dir data/output

rewrites <output_dir>/report/index.html from the run's files (e.g. after
`pipelines.monitor` added monitoring/report.json); a batch run writes it
at its end (`write_report`), after its summary and metrics.prom
(`finish_summary`) and its line of the run history (pipelines.runs).

The page has no script and loads nothing: one <style> block, inline SVG
(every plot, the feature histograms of pipelines.validation.stats_report
too, by matplotlib's SVG backend through pipelines.outputs.plots), links
relative to the page. Sections, each
present only when the run has what it shows (a features-only run, one the
validation gate stopped and a scoring-only run leave out what they did not
do): summary, stages, records, anomalies, drift, model (with the model
types compared), importance (permutation importance per raw feature, with
each feature's drift and skew), curves (a log false-positive ROC beside
the linear one when AUC > 0.95), calibration, scores, risk, registry,
monitoring (with the important features that drifted), features, history,
outputs. Nothing in it reads the clock: rendering the same folder twice
gives the same page (the stage durations are the run's measurements).
"""

from pipelines.base import quiet  # noqa: F401  (first: silences TensorFlow)

import html
import io
import json
import os
import types
from typing import Any, Dict, List, Optional

from apache_beam.io.filesystems import FileSystems
import numpy as np

from pipelines.runs import run_history as history
from pipelines.validation import stats_report
from pipelines.outputs import metrics
from pipelines.outputs import files
from pipelines.outputs import plots

REPORT_DIR, REPORT_FILE = 'report', 'index.html'
SUMMARY_FILE = 'run_summary.json'
MONITORING_REPORT = ('monitoring', 'report.json')
EXAMPLES_PER_KIND = 3
RAW_CHARS = 160
HISTORY_ROWS = 12


def report_path(output_dir: str) -> str:
  return files.join(output_dir, REPORT_DIR, REPORT_FILE)


# The end of a batch run -------------------------------------------------------
def finish_summary(summary: Dict[str, Any], output_dir: str,
                   history_path: str) -> List[str]:
  """At the end of a batch run (ended ok, or stopped by the gate): adds the
  health score and where the metrics, report and history go to the
  summary, writes run_summary.json and metrics.prom; returns the lines to
  print (health, metrics)."""
  summary['health'] = metrics.health(summary)
  paths = {'metrics': files.join(output_dir, metrics.METRICS_FILE),
           'report': report_path(output_dir), 'history': history_path}
  summary.setdefault('outputs', {}).update(paths)
  files.write_json(files.join(output_dir, SUMMARY_FILE), summary)
  metrics.write_metrics(summary, paths['metrics'])
  return [f'Health score:          {summary["health"]["score"]:.3f}',
          f'Metrics:               {paths["metrics"]}']


# Reading the run's files --------------------------------------------------------
def _exists(path: Optional[str]) -> bool:
  return bool(path) and FileSystems.exists(path)


def _json(path: str):
  return files.read_json(path) if _exists(path) else None


def dead_letter_examples(output_dir: str, per_kind: int = EXAMPLES_PER_KIND
                         ) -> Dict[str, List[Dict[str, Any]]]:
  """The first `per_kind` dead-letter rows of each kind, by (source file,
  position)."""
  found: Dict[str, List[Dict[str, Any]]] = {}
  for path in files.files_in(files.join(output_dir, 'dead_letter'),
                             '*.jsonl'):
    for line in files.read_bytes(path).decode('utf-8').splitlines():
      if line.strip():
        row = json.loads(line)
        found.setdefault(row.get('error_kind', '?'), []).append(row)
  return {kind: sorted(rows, key=lambda r: (str(r.get('source_file')),
                                            r.get('position') or 0))[
                                                :per_kind]
          for kind, rows in sorted(found.items())}


def _parquet_columns(folder: str, columns: List[str]):
  import pyarrow as pa
  import pyarrow.parquet as pq
  tables = []
  for path in files.files_in(folder, '*.parquet'):
    with FileSystems.open(path) as f:
      table = pq.read_table(io.BytesIO(f.read()))
    tables.append(table.select([c for c in columns
                                if c in table.column_names]))
  return pa.concat_tables(tables, promote=True) if tables else None


def eval_curves(output_dir: str, metadata: Dict[str, Any]
                ) -> Optional[Dict[str, Any]]:
  """Labels-and-scores curves of the model's eval split, binary only:
  {roc: {fpr, tpr}, pr: {precision, recall}, roc_auc, source}.

  Stored curves (metadata metrics.eval.curves) win; else, when the run
  trained this model, the eval split is rebuilt from the run's
  transform/transformed rows with pipelines.train.split (the split the
  trainer made) and scored with the model."""
  if metadata.get('task', 'binary') != 'binary':
    return None
  stored = (metadata.get('metrics') or {}).get('eval', {}).get('curves')
  if stored:
    return dict(stored, source='stored with the model')
  own = _json(files.join(output_dir, 'model', 'metadata.json'))
  transformed = files.join(output_dir, 'transform', 'transformed')
  if not own or own.get('model_version') != metadata.get('model_version') \
      or not files.files_in(transformed, '*.parquet'):
    return None
  from sklearn.metrics import (precision_recall_curve, roc_auc_score,
                               roc_curve)
  from pipelines.model import training as train
  from transforms import inference
  label = metadata['label_field']
  table = train.read_transformed(transformed)
  table = table.filter(table.column(label).is_valid())
  split_of = types.SimpleNamespace(
      timestamp_field=metadata.get('timestamp_field'),
      id_field=metadata['id_field'], label_field=label, task='binary')
  _, rows = train.split(table, split_of, metadata.get('training', {}).get(
      'eval_fraction', 0.2))
  model_dir = files.join(output_dir, 'model')
  estimator = inference.loads_estimator(
      files.read_bytes(files.join(model_dir, metadata['model_file'])), model_dir)
  features = metadata['features']
  scores = estimator.predict_proba(inference.feature_matrix(
      {n: rows.column(n) for n in features}, features))[:, 1]
  labels = rows.column(label).to_numpy().astype(np.int64)
  if len(np.unique(labels)) < 2:
    return None
  fpr, tpr, _ = roc_curve(labels, scores)
  precision, recall, _ = precision_recall_curve(labels, scores)
  return {'roc': {'fpr': fpr.tolist(), 'tpr': tpr.tolist()},
          'pr': {'precision': precision.tolist(), 'recall': recall.tolist()},
          'roc_auc': float(roc_auc_score(labels, scores)),
          'positives': int(labels.sum()), 'rows': int(len(labels)),
          'source': 'eval split rebuilt from transform/transformed'}


# Plots (matplotlib's SVG backend) -------------------------------------------------
_ACCENT, _MUTED, _WARN = plots.ACCENT, plots.MUTED, plots.WARN
_figure, svg_of = plots.figure, plots.svg_of


def roc_svg(curves) -> str:
  fig, ax = _figure()
  ax.plot([0, 1], [0, 1], color=_MUTED, linestyle='--', linewidth=1,
          label='chance')
  ax.step(curves['roc']['fpr'], curves['roc']['tpr'], where='post',
          color=_ACCENT, linewidth=1.8,
          label=f'model (AUC {curves["roc_auc"]:.3f})')
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='false positive rate',
         ylabel='true positive rate', title='ROC curve (eval split)')
  ax.legend(loc='lower right', frameon=False)
  return svg_of(fig, 'roc')


# Above this eval ROC AUC the linear curve hugs the top-left corner: the
# curves section adds the same curve on a log-scaled false-positive axis.
LOG_ROC_ABOVE = 0.95


def roc_log_svg(curves) -> str:
  """The ROC curve with the false-positive rate on a log scale, from one
  false positive of the eval split to all of them: where a model that
  separates well differs."""
  fpr = np.asarray(curves['roc']['fpr'], float)
  tpr = np.asarray(curves['roc']['tpr'], float)
  negatives = max(int(curves.get('rows') or 0) -
                  int(curves.get('positives') or 0), 1)
  low = 1.0 / negatives
  fig, ax = _figure()
  grid = np.logspace(np.log10(low), 0, 50)
  ax.plot(grid, grid, color=_MUTED, linestyle='--', linewidth=1,
          label='chance')
  keep = fpr > 0
  ax.step(np.clip(fpr[keep], low, 1), tpr[keep], where='post',
          color=_ACCENT, linewidth=1.8,
          label=f'model (AUC {curves["roc_auc"]:.3f})')
  ax.set_xscale('log')
  ax.set(xlim=(low * 0.9, 1), ylim=(0, 1.02),
         xlabel='false positive rate (log)', ylabel='true positive rate',
         title='ROC curve, log false-positive axis')
  ax.legend(loc='lower right', frameon=False)
  return svg_of(fig, 'roc-log')


def importance_svg(importance: Dict[str, Any], top: int = 15) -> str:
  """Horizontal bars: each raw feature's mean drop of the eval metric when
  permuted, with its standard deviation over the repeats."""
  features = importance['features'][:top][::-1]
  fig, ax = _figure(6.2, 0.9 + 0.24 * max(len(features), 1))
  names = [f['feature'] for f in features]
  ax.barh(names, [f['mean'] for f in features],
          xerr=[f['std'] for f in features], color=_ACCENT, height=0.6,
          error_kw={'ecolor': _MUTED, 'elinewidth': 1, 'capsize': 2})
  ax.axvline(0, color=_MUTED, linewidth=0.8)
  ax.grid(False, axis='y')
  ax.set(xlabel=f'drop of {importance["metric"]} when permuted (eval split)',
         title='Feature importance (permutation)')
  return svg_of(fig, 'importance')


def pr_svg(curves, base_rate: Optional[float]) -> str:
  fig, ax = _figure()
  ax.step(curves['pr']['recall'], curves['pr']['precision'], where='post',
          color=_ACCENT, linewidth=1.8, label='model')
  if base_rate is not None:
    ax.axhline(base_rate, color=_MUTED, linestyle='--', linewidth=1,
               label=f'base rate {base_rate:.3f}')
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='recall', ylabel='precision',
         title='Precision-recall curve (eval split)')
  ax.legend(loc='lower left', frameon=False)
  return svg_of(fig, 'pr')


def calibration_svg(bins: List[Dict[str, Any]], title: str, name: str
                    ) -> str:
  """Reliability: observed positive rate against mean score per bin
  (marker area by the bin's count)."""
  fig, ax = _figure()
  ax.plot([0, 1], [0, 1], color=_MUTED, linestyle='--', linewidth=1,
          label='perfect calibration')
  used = [b for b in bins if b.get('count')]
  if used:
    counts = np.array([b['count'] for b in used], float)
    sizes = 12 + 140 * np.sqrt(counts / counts.max())
    ax.plot([b['mean_score'] for b in used],
            [b['positive_rate'] for b in used], color=_ACCENT, linewidth=1)
    ax.scatter([b['mean_score'] for b in used],
               [b['positive_rate'] for b in used], s=sizes, color=_ACCENT,
               alpha=0.8, label='score bins (area: rows)', zorder=3)
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='mean predicted score',
         ylabel='observed positive rate', title=title)
  ax.legend(loc='lower right', frameon=False)
  return svg_of(fig, name)


def score_histogram_svg(scores: Optional[np.ndarray],
                        reference: Optional[Dict[str, Any]],
                        threshold: Optional[float]) -> str:
  """This run's scores against the model's eval-split scores (shares of
  rows per bin, log scale), with the threshold."""
  fig, ax = _figure(6.2, 3.3)
  edges = np.asarray(reference['edges'] if reference else
                     np.linspace(0, 1, 21), float)
  width = np.diff(edges)
  if reference:
    counts = np.asarray(reference['counts'], float)
    ax.bar(edges[:-1], counts / max(counts.sum(), 1), width=width,
           align='edge', color=_MUTED, alpha=0.55,
           label='eval split (training time)')
  if scores is not None and len(scores):
    counts, _ = np.histogram(scores, bins=edges)
    ax.step(edges, np.append(counts, counts[-1]) / len(scores), where='post',
            color=_ACCENT, linewidth=1.8,
            label=f'this run ({len(scores):,} predictions)')
  if threshold is not None:
    ax.axvline(threshold, color=_WARN, linewidth=1.2,
               label=f'threshold {threshold:.3g}')
  ax.set_yscale('log')
  ax.set(xlim=(0, 1), xlabel='score', ylabel='share of rows (log)',
         title='Score distribution')
  ax.legend(loc='upper right', frameon=False)
  return svg_of(fig, 'scores')


# HTML pieces ---------------------------------------------------------------------
def _e(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
  if value is None:
    return '–'
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return f'{value:,}'
  if isinstance(value, float):
    return f'{value:.{digits}f}' if abs(value) < 1e6 else f'{value:.4g}'
  return str(value)


def _clip_text(text: str, limit: int = RAW_CHARS) -> str:
  return text if len(text) <= limit else text[:limit - 1] + '\u2026'


def _pct(part, whole) -> str:
  return f'{100.0 * part / whole:.1f}%' if whole else '–'


def _table(head: List[str], rows: List[List[str]], numeric=()) -> str:
  """`rows` hold HTML already escaped; columns in `numeric` right-aligned."""
  ths = ''.join(f'<th class="num">{_e(h)}</th>' if i in numeric else
                f'<th>{_e(h)}</th>' for i, h in enumerate(head))
  body = ''.join('<tr>' + ''.join(
      f'<td class="num">{c}</td>' if i in numeric else f'<td>{c}</td>'
      for i, c in enumerate(row)) + '</tr>' for row in rows)
  return f'<table><tr>{ths}</tr>{body}</table>'


def _section(key: str, title: str, body: str, sub: str = '') -> str:
  sub = f'<p class="sub">{sub}</p>' if sub else ''
  return (f'<section id="{key}" class="part"><h2>{_e(title)}</h2>{sub}'
          f'{body}</section>')


def _bar(share: float, css: str = '') -> str:
  share = min(max(share, 0.0), 1.0)
  return (f'<span class="meter {css}"><span style="width:'
          f'{100 * share:.1f}%"></span></span>')


def _link(path: str, page_dir: str) -> str:
  """A link relative to the page for a local path; gs:// and other remote
  paths are shown, not linked (the page links nothing off the machine)."""
  if '://' in path:
    return f'<span class="mono">{_e(path)}</span>'
  rel = os.path.relpath(path, page_dir).replace(os.sep, '/')
  if os.path.isdir(path):
    rel += '/'
  return f'<a class="mono" href="{_e(rel)}">{_e(path)}</a>'


_CSS = """
.part { margin-top:8px; }
nav.toc2 { margin:14px 0 0; display:flex; flex-wrap:wrap; gap:6px 14px;
  font-size:13px; }
.status { font-size:13px; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit,minmax(330px,1fr));
  gap:14px; align-items:start; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px;
  padding:10px 12px; }
svg.plot { width:100%; height:auto; display:block; }
svg.plot text { font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,
  sans-serif; fill:#1f2933; }
.meter { display:inline-block; width:160px; height:10px; background:#e4e7eb;
  border-radius:5px; overflow:hidden; vertical-align:middle; }
.meter > span { display:block; height:100%; background:var(--bar); }
.meter.over > span { background:var(--warn); }
.meter.thresh { position:relative; }
pre.raw { margin:2px 0 0; white-space:pre-wrap; word-break:break-all;
  font:11px/1.35 ui-monospace,Menlo,Consolas,monospace; color:var(--muted); }
ul.ex { margin:0; padding:0; list-style:none; }
ul.ex li { margin:0 0 6px; min-width:0; }
.pos { color:var(--muted); font-variant-numeric:tabular-nums; }
td { overflow-wrap:anywhere; }
h3.h3 { font-family:inherit; font-size:14px; margin:18px 0 8px; }
.card.wide { max-width:780px; }
.fbody > div { min-width:0; }
.badge { white-space:nowrap; }
.kpi.health b { color:var(--ok); } .kpi.health.low b { color:var(--err); }
.kpi.health.mid b { color:var(--warn); }
"""


# Sections ------------------------------------------------------------------------
def _summary_section(s: Dict[str, Any], dataset: str) -> str:
  status = s.get('status', '?')
  css = 'OK' if status == 'ok' else 'ERROR' if status.startswith(
      ('stopped', 'failed')) else 'INFO'
  note = f' ({_e(s["stopped_after"])})' if s.get('stopped_after') else ''
  read = s.get('records_read') or 0
  counts = (s.get('validation') or {}).get('anomalies') or {}
  score = (s.get('health') or {}).get('score')
  level = '' if score is None else ' low' if score < 0.5 else (
      ' mid' if score < 0.8 else '')
  kpis = [('records read', _num(read)),
          ('valid', _pct(s.get('records_valid', 0), read)),
          ('dead-lettered', _num(s.get('records_dead_lettered')))]
  if counts:
    kpis.append(('errors / warnings', f'{counts.get("ERROR", 0)} / '
                 f'{counts.get("WARNING", 0)}'))
  if s.get('model'):
    kpis.append(('predictions', _num(s.get('predictions_written'))))
  cards = ''.join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                  for k, v in kpis)
  if score is not None:
    cards = (f'<div class="kpi health{level}"><b>{score:.3f}</b>'
             '<span>health score</span></div>') + cards
  return (f'<section id="summary"><h1>{_e(dataset)}: run report</h1>'
          f'<p class="sub status"><span class="badge {css}">'
          f'{_e(status.upper())}</span>{note}</p>'
          f'<div class="cards">{cards}</div></section>')


# The batch job's stages in run order (run_summary.json sorts its keys).
STAGE_ORDER = ('Ingest and features', 'Validate', 'Transform', 'Train',
               'Predict')


def _stages_section(s) -> str:
  stages = s.get('stage_seconds') or {}
  if not stages:
    return ''
  rank = {name: i for i, name in enumerate(STAGE_ORDER)}
  stages = dict(sorted(stages.items(),
                       key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
  total = sum(stages.values()) or 1.0
  rows = [[_e(name), f'{seconds:.1f}', _bar(seconds / total)]
          for name, seconds in stages.items()]
  rows.append(['<b>total</b>', f'<b>{sum(stages.values()):.1f}</b>', ''])
  return _section('stages', 'Stage timings', _table(
      ['stage', 'seconds', ''], rows, numeric=(1,)),
      'Wall time of each stage of this run (measured, so it differs '
      'between reruns).')


def _records_section(s, examples) -> str:
  read = s.get('records_read') or 0
  rows = [['read', _num(read), '']] + [
      [f'read from {_e(source)}', _num(count), _pct(count, read)]
      for source, count in (s.get('records_read_by_source') or {}).items()
  ] + [
          ['valid', _num(s.get('records_valid')),
           _pct(s.get('records_valid', 0), read)],
          ['dead-lettered', _num(s.get('records_dead_lettered')),
           _pct(s.get('records_dead_lettered', 0), read)],
          ['feature rows', _num(s.get('feature_rows')), '']]
  for key, count in (s.get('aggregate_rows') or {}).items():
    rows.append([f'aggregate rows: {_e(key)}', _num(count), ''])
  if s.get('model'):
    rows.append(['predictions', _num(s.get('predictions_written')), ''])
  body = _table(['', 'rows', 'share of read'], rows, numeric=(1, 2))
  kinds = s.get('dead_letter_by_kind') or {}
  if kinds:
    kind_rows = []
    for kind, count in kinds.items():
      shown = ''.join(
          f'<li><span class="pos">#{_e(r.get("position"))}</span> '
          + (f'<span class="mono">{_e(r["field"])}</span>: '
             if r.get('field') else '') +
          f'{_e(r.get("message", ""))}<pre class="raw">'
          f'{_e(_clip_text(str(r.get("raw", ""))))}</pre></li>'
          for r in examples.get(kind, []))
      kind_rows.append([f'<span class="mono">{_e(kind)}</span>', _num(count),
                        f'<ul class="ex">{shown}</ul>' if shown else ''])
    body += ('<h3 class="h3">Dead letters by kind, with the first '
             f'{EXAMPLES_PER_KIND} of each (position in the file, field, '
             'message, raw record)</h3>' +
             _table(['kind', 'rows', 'examples'], kind_rows, numeric=(1,)))
  accounted = s.get('records_accounted_for')
  sub = ('read = valid + dead-lettered: every record is accounted for'
         if accounted else 'read ≠ valid + dead-lettered' if
         accounted is False else '')
  return _section('records', 'Records', body, sub)


def _anomalies_section(anomalies) -> str:
  if anomalies is None:
    return ''
  table = stats_report.anomalies_table(anomalies)
  table = table.replace('<h2>Anomalies</h2>', '', 1)
  return _section('anomalies', 'Anomalies', table,
                  'ERROR stops the run; WARNING and INFO are reported.')


def _comparison_table(result) -> str:
  rows = []
  for name, f in sorted((result.get('features') or {}).items()):
    value, threshold = f.get('value'), f.get('threshold')
    if value is None:
      status, meter = '<span class="badge INFO">NOT COMPARED</span>', ''
    else:
      over = bool(f.get('drifted'))
      status = ('<span class="badge WARNING">ABOVE THRESHOLD</span>' if over
                else '<span class="badge OK">OK</span>')
      meter = _bar(value / (2 * threshold) if threshold else 1.0,
                   'over' if over else '')
    rows.append([f'<a class="mono" href="#{stats_report.feature_anchor(name)}'
                 f'">{_e(name)}</a>', _e(f.get('measure', '')), _num(value),
                 _num(threshold), meter, status])
  return _table(['feature', 'measure', 'distance', 'threshold',
                 'distance / 2 x threshold', 'status'], rows,
                numeric=(2, 3))


def _drift_section(drift, skew) -> str:
  parts = []
  for result, title, other in ((drift, 'Drift against --baseline_stats',
                                'baseline'),
                               (skew, 'Training/serving skew', 'training')):
    if not result:
      continue
    n = result.get('num_examples') or {}
    parts.append(f'<h3 class="h3">{_e(title)}</h3><p class="sub">this run '
                 f'{_num(n.get("current"))} examples, {other} '
                 f'{_num(n.get("baseline"))}</p>' + _comparison_table(result))
  if not parts:
    return ''
  return _section('drift', 'Drift and skew', ''.join(parts),
                  'TFDV distances per compared feature (Jensen-Shannon for '
                  'numbers, L-infinity for categories); the bar is half full '
                  'at the threshold.')


_METRIC_ORDER = ('rows', 'positives', 'roc_auc', 'pr_auc', 'precision',
                 'recall', 'brier', 'log_loss', 'accuracy', 'rmse', 'mae',
                 'r2')


def _model_block(model, metadata) -> str:
  """A model's facts and train/eval metrics (and the model types it was
  compared with), from its summary and metadata.json."""
  full = (metadata or {}).get('metrics') or model.get('metrics') or {}
  splits = [k for k in ('train', 'eval') if k in full]
  names = [k for k in _METRIC_ORDER if any(
      isinstance(full[sp].get(k), (int, float)) for sp in splits)]
  rows = [[_e(n)] + [_num(full[sp].get(n)) for sp in splits] for n in names]
  body = _table(['metric'] + splits, rows,
                numeric=tuple(range(1, len(splits) + 1)))
  selection = (metadata or {}).get('threshold_selection') or {}
  facts = [('version', model.get('version')), ('type', model.get('type')),
           ('task', model.get('task')), ('threshold',
                                         _num(model.get('threshold'))),
           ('threshold from', selection.get('method') or
            model.get('threshold_from')),
           ('split', model.get('split')),
           ('trained in this run', model.get('trained_in_this_run')),
           ('registry status', model.get('registry_status'))]
  kv = ''.join(f'<tr><td>{_e(k)}</td><td class="mono">{_e(v)}</td></tr>'
               for k, v in facts if v is not None)
  body = (f'<div class="grid2"><table class="kv">{kv}</table>'
          f'<div>{body}</div></div>')
  compared = model.get('compared')
  if compared:
    keys = sorted({k for m in compared['eval'].values() for k in m})
    rows = [[_e(kind) + (' <span class="badge OK">CHOSEN</span>'
                         if kind == compared.get('chosen') else '')] +
            [_num(m.get(k)) for k in keys]
            for kind, m in compared['eval'].items()]
    body += (f'<h3 class="h3">Model types compared on '
             f'{_e(compared.get("metric"))} (eval)</h3>' +
             _table(['type'] + keys, rows,
                    numeric=tuple(range(1, len(keys) + 1))))
  return body


def _model_section(s, metadata, trained_metadata=None) -> str:
  """The model that scored; in a run whose trained model did not score
  (a candidate while the registry's champion scores), that model first."""
  model = s.get('model')
  if not model:
    return ''
  trained = s.get('trained_model')
  if not trained or trained.get('version') == model.get('version'):
    return _section('model', 'Model', _model_block(model, metadata),
                    'The model that scored this run\'s predictions, with '
                    'its training-time metrics' +
                    (', trained in this run.' if trained else '.'))
  status = trained.get('registry_status') or 'not registered'
  body = (f'<h3 class="h3">Trained in this run: <span class="mono">'
          f'{_e(trained["version"])}</span> ({_e(status)}; it did not '
          'score)</h3>' + _model_block(trained, trained_metadata) +
          f'<h3 class="h3">Scored this run\'s predictions: <span '
          f'class="mono">{_e(model["version"])}</span> '
          f'({_e(model.get("registry_status") or "champion")})</h3>' +
          _model_block(model, metadata))
  return _section('model', 'Model', body,
                  'This run trained one model and scored with another: '
                  'both, with their training-time metrics.')


def _curves_section(curves, metadata) -> str:
  if not curves:
    return ''
  ev = (metadata.get('metrics') or {}).get('eval') or {}
  rate = (ev['positives'] / ev['rows']) if ev.get('rows') else None
  log = ''
  if (curves.get('roc_auc') or 0) > LOG_ROC_ABOVE:
    log = f'<div class="card">{roc_log_svg(curves)}</div>'
  return _section('curves', 'ROC and precision-recall', (
      f'<div class="grid2"><div class="card">{roc_svg(curves)}</div>{log}'
      f'<div class="card">{pr_svg(curves, rate)}</div></div>'),
      f'Model <span class="mono">{_e(metadata.get("model_version"))}</span>'
      f', eval split: {_num(curves.get("rows"))} rows, '
      f'{_num(curves.get("positives"))} positives ({_e(curves["source"])})' +
      ('; with AUC above 0.95 the curve is also drawn on a log '
       'false-positive axis, where models that separate well differ.'
       if log else '.'))


def _importance_section(metadata, drift, skew) -> str:
  """The model's permutation importance: a bar chart, and a table with each
  feature's drift and skew in this run."""
  found = (metadata or {}).get('importance')
  if not found:
    return ''
  from pipelines.model.importance import important_drift
  moved = important_drift(found, {'drift': drift, 'skew': skew},
                          top=len(found['features']))

  def status(measured):
    if not measured:
      return '–'
    css, word = (('WARNING', 'ABOVE') if measured.get('drifted') else
                 ('OK', 'OK'))
    return (f'{_num(measured.get("value"))} <span class="badge {css}">'
            f'{word}</span>')
  spread = {f['feature']: f for f in found['features']}
  rows = [[f'<span class="mono">{_e(r["feature"])}</span>',
           _num(r['importance']), _num(spread[r['feature']]['std']),
           _num(spread[r['feature']]['columns']), status(r['drift']),
           status(r['skew'])] for r in moved['features']]
  sub = (f'{_e(found.get("method", "permutation importance"))}; '
         f'{_num(found.get("n_repeats"))} repeats on '
         f'{_num(found.get("rows"))} eval rows.')
  if moved['drifted']:
    sub += (' <b>Important features that drifted: ' +
            ', '.join(_e(n) for n in moved['drifted']) + '.</b>')
  return _section('importance', 'Feature importance', (
      f'<div class="card wide">{importance_svg(found)}</div>' +
      _table(['feature', f'drop of {_e(found["metric"])}', 'std',
              'model columns', 'drift', 'skew'], rows,
             numeric=(1, 2, 3))), sub)


def _calibration_section(metadata) -> str:
  bins = ((metadata or {}).get('metrics') or {}).get('eval', {}).get(
      'reliability')
  if not bins:
    return ''
  brier = metadata['metrics']['eval'].get('brier')
  rows = [[f'{b["lower"]:.1f} – {b["upper"]:.1f}', _num(b['count']),
           _num(b['mean_score']), _num(b['positive_rate'])] for b in bins
          if b.get('count')]
  return _section('calibration', 'Calibration', (
      '<div class="grid2"><div class="card">' +
      calibration_svg(bins, 'Reliability (eval split)', 'calibration') +
      '</div><div>' + _table(['score bin', 'rows', 'mean score',
                              'positive rate'], rows, numeric=(1, 2, 3)) +
      '</div></div>'),
      f'Model <span class="mono">{_e(metadata.get("model_version"))}'
      f'</span>: Brier score {_num(brier)} on the eval split; empty bins '
      'left out.')


def _scores_section(metadata, predictions) -> str:
  if not metadata or metadata.get('task', 'binary') != 'binary':
    return ''
  reference = metadata.get('eval_score_distribution')
  scores = None
  if predictions is not None and 'score' in predictions.column_names:
    scores = np.asarray(predictions.column("score").to_numpy(), float)
  if reference is None and scores is None:
    return ''
  return _section('scores', 'Scores', '<div class="card wide">' +
                  score_histogram_svg(scores, reference,
                                      metadata.get('threshold')) + '</div>',
                  "This run's predicted scores against the eval split's "
                  'at training time.')


def _risk_section(metadata, predictions) -> str:
  risk = (metadata or {}).get('risk')
  if not risk or not risk.get('bands'):
    return ''
  bands = risk['bands']
  bands = list(bands.items()) if isinstance(bands, dict) else bands
  counts: Dict[str, int] = {}
  if predictions is not None and 'risk_category' in predictions.column_names:
    for value in predictions.column('risk_category').to_pylist():
      counts[value] = counts.get(value, 0) + 1
  total = sum(counts.values())
  rows = []
  for i, (name, lower) in enumerate(bands):
    upper = bands[i + 1][1] if i + 1 < len(bands) else 1.0
    count = counts.get(name, 0)
    rows.append([f'<span class="mono">{_e(name)}</span>',
                 f'[{lower:g}, {upper:g}' + (']' if i + 1 == len(bands)
                                             else ')'),
                 _num(count), _pct(count, total),
                 _bar(count / total if total else 0.0)])
  return _section('risk', 'Risk bands', _table(
      ['category', 'score range', 'predictions', 'share', ''], rows,
      numeric=(2, 3)),
      f'From the declaration\'s risk: section; confidence: '
      f'{_e(risk.get("confidence"))}.')


def _registry_section(s) -> str:
  registry = s.get('registry')
  if not registry:
    return ''
  from pipelines.model.registry import Registry, RegistryError
  body = (f'<p>This run registered <span class="mono">'
          f'{_e(registry.get("registered"))}</span> as '
          f'<b>{_e(registry.get("status"))}</b>; the champion '
          f'<span class="mono">{_e(registry.get("champion"))}</span> '
          'scored.</p>')
  try:
    entries = Registry(registry['root']).entries()
  except (RegistryError, OSError) as e:
    return _section('registry', 'Model registry',
                    body + f'<p class="empty">registry unreadable: {_e(e)}'
                    '</p>')
  rows = []
  for entry in entries:
    m = entry.get('metrics') or {}
    key = next((k for k in ('roc_auc', 'log_loss', 'rmse')
                if m.get(k) is not None), None)
    css = {'champion': 'OK', 'candidate': 'INFO'}.get(entry['status'],
                                                      'type')
    rows.append([f'<span class="mono">{_e(entry["version"])}</span>',
                 f'<span class="badge {css}">{_e(entry["status"].upper())}'
                 '</span>', _e(entry.get('model_type')),
                 f'{key} {_num(m[key])}' if key else '–',
                 _e(entry.get('registered_at') or '–'),
                 _e(', '.join(list((entry.get('importance') or {}).get(
                     'top', {}))[:3]) or '–')])
  return _section('registry', 'Model registry', body + _table(
      ['version', 'status', 'type', 'eval metric', 'registered at',
       'top features'], rows),
      f'<span class="mono">{_e(registry.get("root"))}</span>')


def _monitoring_section(monitoring) -> str:
  if not monitoring:
    return ''
  parts = []
  counts = monitoring.get('counts') or {}
  if counts:
    parts.append(_table(['count', 'value'], [
        [_e(k), _num(v)] for k, v in sorted(counts.items())], numeric=(1,)))
  now = monitoring.get('metrics') or {}
  then = monitoring.get('eval_metrics') or {}
  change = monitoring.get('change') or {}
  keys = [k for k in ('roc_auc', 'pr_auc', 'precision', 'recall', 'brier')
          if k in now or k in then]
  if keys:
    parts.append(_table(['metric', 'with labels now', 'eval at training',
                         'change'],
                        [[_e(k), _num(now.get(k)), _num(then.get(k)),
                          _num(change.get(k))] for k in keys],
                        numeric=(1, 2, 3)))
  drift = monitoring.get('score_drift')
  if drift:
    parts.append(f'<p>Score drift against the eval split: Jensen-Shannon '
                 f'distance {_num(drift.get("js_distance"))}, PSI '
                 f'{_num(drift.get("psi"))} over {_num(drift.get("rows"))} '
                 'predictions.</p>')
  plot = ''
  if monitoring.get('calibration'):
    plot = ('<div class="card">' + calibration_svg(
        monitoring['calibration'], 'Reliability (labelled predictions)',
        'monitoring-calibration') + '</div>')
  trend = (monitoring.get('trend') or {}).get('days') or []
  if trend:
    parts.append(_table(['day', 'rows', 'positives', 'ROC AUC', 'mean score'],
                        [[_e(d.get('date')), _num(d.get('rows')),
                          _num(d.get('positives')), _num(d.get('roc_auc')),
                          _num(d.get('mean_score'))] for d in trend],
                        numeric=(1, 2, 3, 4)))
  important = monitoring.get('important_features') or {}
  if important.get('features'):
    moved = important.get('drifted') or []
    parts.append('<p>Important features that drifted: ' + (
        ', '.join(f'<span class="mono">{_e(n)}</span>' for n in moved)
        if moved else 'none') + f' (of the top {len(important["features"])}'
        ' by importance).</p>')
  version = (monitoring.get('model') or {}).get('version')
  return _section('monitoring', 'Monitoring', (
      f'<div class="grid2"><div>{"".join(parts)}</div>{plot}</div>'),
      f'From monitoring/report.json (pipelines.monitor): predictions of '
      f'<span class="mono">{_e(version)}</span> joined with the labels '
      'that arrived since.')


def _features_section(stats, anomalies, timestamp_features) -> str:
  if stats is None or not stats.datasets:
    return ''
  n = stats.datasets[0].num_examples
  return _section('features', 'Feature statistics', stats_report.feature_cards(
      stats, anomalies, timestamp_features),
      f'{_num(int(n))} feature rows; TFDV statistics from '
      'statistics/stats.pb (histograms: equal-width buckets).')


def _history_section(entries, broken, output_dir) -> str:
  if not entries:
    return ''
  rows = history.rows(entries[-HISTORY_ROWS:])
  head = [k for k in rows[0] if k != 'output']
  body = []
  for r in rows:
    mine = r['output'] == output_dir
    cells = [_e('–' if r[k] is None else f'{r[k]:.3f}'
                if isinstance(r[k], float) else r[k]) for k in head]
    if mine:
      cells[0] = f'<b>{cells[0]} (this run)</b>'
    body.append(cells)
  return _section('history', 'Run history', _table(
      head, body, numeric=(2, 3, 4, 5, 6, 7, 10)),
      f'The latest {len(rows)} runs of the history '
      '(python -m pipelines.history prints all)' +
      (f'; {history.skipped_note(broken)}.' if broken else '.'))


def _outputs_section(s, output_dir, page_dir) -> str:
  outputs = dict(s.get('outputs') or {})
  outputs.setdefault('summary', files.join(output_dir, SUMMARY_FILE))
  stats_html = files.join(output_dir, 'validation', 'stats.html')
  if _exists(stats_html):
    outputs['statistics page'] = stats_html
  monitoring = files.join(output_dir, *MONITORING_REPORT)
  if _exists(monitoring):
    outputs['monitoring'] = monitoring
  if (s.get('model') or {}).get('dir'):
    outputs.setdefault('model', s['model']['dir'])
  rows = [[_e(name), _link(path, page_dir)]
          for name, path in outputs.items() if path]
  return _section('outputs', 'Outputs', _table(['output', 'path'], rows))


_TITLES = {'summary': 'Summary', 'stages': 'Stages', 'records': 'Records',
           'anomalies': 'Anomalies', 'drift': 'Drift', 'model': 'Model',
           'importance': 'Importance', 'curves': 'ROC / PR', 'calibration': 'Calibration',
           'scores': 'Scores', 'risk': 'Risk', 'registry': 'Registry',
           'monitoring': 'Monitoring', 'features': 'Features',
           'history': 'History', 'outputs': 'Outputs'}


def render(output_dir: str, summary: Optional[Dict[str, Any]] = None,
           history_path: Optional[str] = None) -> str:
  """The report page of the run in `output_dir` (its run_summary.json
  unless `summary` is given)."""
  from transforms.statistics import read_statistics
  s = summary or files.read_json(files.join(output_dir, SUMMARY_FILE))
  page_dir = files.join(output_dir, REPORT_DIR)
  validation_dir = files.join(output_dir, 'validation')
  anomalies = (_json(files.join(validation_dir, 'anomalies.json')) or {}).get(
      'anomalies') if s.get('validation') else None
  stats_path = files.join(output_dir, 'statistics', 'stats.pb')
  stats = read_statistics(stats_path) if _exists(stats_path) else None
  model = s.get('model')
  metadata = None
  if model and _exists(files.join(model.get('dir', ''), 'metadata.json')):
    metadata = files.read_json(files.join(model['dir'], 'metadata.json'))
  predictions = None
  if model:
    predictions = _parquet_columns(
        files.join(output_dir, 'predictions'),
        ['score', 'risk_category'])
  # The model trained in this run, when it is not the one that scored
  # (a candidate): its curves and calibration are this run's eval split.
  trained = s.get('trained_model')
  trained_metadata = metadata
  if trained and trained.get('version') != (model or {}).get('version') \
      and _exists(files.join(trained.get('dir', ''), 'metadata.json')):
    trained_metadata = files.read_json(files.join(trained['dir'],
                                                  'metadata.json'))
  curves = (eval_curves(output_dir, trained_metadata) if trained_metadata
            else None)
  timestamp = (metadata or {}).get('timestamp_field')
  dataset = (metadata or {}).get('dataset') or s.get('dataset') or 'run'
  sections = [
      _summary_section(s, dataset),
      _stages_section(s),
      _records_section(s, dead_letter_examples(output_dir)),
      _anomalies_section(anomalies),
      _drift_section(_json(files.join(validation_dir, 'drift.json')),
                     _json(files.join(validation_dir, 'skew.json'))),
      _model_section(s, metadata, trained_metadata),
      # The importance of the model trained in this run (else the scorer).
      _importance_section(
          trained_metadata, _json(files.join(validation_dir, 'drift.json')),
          _json(files.join(validation_dir, 'skew.json'))),
      _curves_section(curves, trained_metadata),
      _calibration_section(trained_metadata) if trained_metadata else '',
      _scores_section(metadata, predictions),
      _risk_section(metadata, predictions),
      _registry_section(s),
      _monitoring_section(_json(files.join(output_dir, *MONITORING_REPORT))),
      _features_section(stats, anomalies or [],
                        [timestamp] if timestamp else []),
      _history_section(*(history.load(history_path) if history_path
                         else history.History([], 0)), output_dir),
      _outputs_section(s, output_dir, page_dir),
  ]
  present = [k for k in _TITLES if f'id="{k}"' in ''.join(sections)]
  nav = ('<nav class="toc2">' + ''.join(
      f'<a href="#{k}">{_e(_TITLES[k])}</a>' for k in present[1:]) +
         '</nav>')
  sections.insert(1, nav)
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width, '
          'initial-scale=1">'
          f'<title>{_e(dataset)}: run report</title>'
          f'<style>{stats_report.CSS}{_CSS}</style></head><body><main>'
          + ''.join(sections) + '</main></body></html>\n')


def write_report(output_dir: str, summary: Optional[Dict[str, Any]] = None,
                 history_path: Optional[str] = None) -> str:
  """Writes report/index.html; returns its path."""
  path = report_path(output_dir)
  page = render(output_dir, summary, history_path)
  with FileSystems.create(path, mime_type='text/html') as f:
    f.write(page.encode('utf-8'))
  return path
