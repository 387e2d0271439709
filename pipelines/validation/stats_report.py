"""A self-contained HTML report of feature statistics, anomalies and drift.

TFDV's own visualisation (Facets) loads its code from a CDN and shows
nothing offline or in a locked-down browser; this page has no scripts and
no external resources: plain HTML, one <style> block and inline SVG charts.

  render_html(stats, anomalies, drift, title) -> str
  write_html(path, stats, anomalies, drift, title) -> path
"""

import datetime
import html
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from apache_beam.io.filesystems import FileSystems
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipelines.outputs import plots

DEFAULT_TITLE = 'Feature statistics'
# TFDV's sketch-based top-k is exact only below this many distinct values.
_EXACT_TOPK_LIMIT = 1024

_CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa;
  --bar:#3b82c4; --err:#c62828; --warn:#b26a00; --info:#2f6f9f; --ok:#2e7d32; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,
  sans-serif; }
main { max-width:1180px; margin:0 auto; padding:24px 20px 60px; }
h1 { font-size:24px; margin:0 0 4px; }
h2 { font-size:18px; margin:32px 0 10px; }
h3 { font-size:15px; margin:0; font-family:ui-monospace,Menlo,Consolas,
  monospace; }
.sub { color:var(--muted); margin:0 0 16px; }
.cards { display:flex; gap:12px; flex-wrap:wrap; }
.kpi { background:#fff; border:1px solid var(--line); border-radius:8px;
  padding:10px 16px; min-width:130px; }
.kpi b { display:block; font-size:20px; }
.kpi span { color:var(--muted); font-size:12px; text-transform:uppercase;
  letter-spacing:.04em; }
table { border-collapse:collapse; width:100%; background:#fff;
  border:1px solid var(--line); border-radius:8px; overflow:hidden; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line);
  text-align:left; vertical-align:top; }
th { background:#eef1f5; font-weight:600; font-size:12px;
  text-transform:uppercase; letter-spacing:.03em; color:var(--muted); }
tr:last-child td { border-bottom:none; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums;
  white-space:nowrap; }
td.mono, .mono { font-family:ui-monospace,Menlo,Consolas,monospace;
  font-size:13px; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px;
  font-size:11px; font-weight:700; letter-spacing:.03em; color:#fff; }
.ERROR { background:var(--err); } .WARNING { background:var(--warn); }
.INFO { background:var(--info); } .OK { background:var(--ok); }
.type { background:#e4e7eb; color:var(--fg); font-weight:600; }
a { color:#1d5fa0; text-decoration:none; }
a:hover { text-decoration:underline; }
.feature { background:#fff; border:1px solid var(--line); border-radius:8px;
  padding:14px 16px; margin:0 0 14px; }
.feature.has-ERROR { border-left:4px solid var(--err); }
.feature.has-WARNING { border-left:4px solid var(--warn); }
.fhead { display:flex; align-items:center; gap:10px; flex-wrap:wrap;
  margin-bottom:10px; }
.fbody { display:grid; grid-template-columns:minmax(240px,1fr) 400px;
  gap:18px; }
@media (max-width:860px) { .fbody { grid-template-columns:1fr; } }
.kv { width:100%; border:none; }
.kv td { border:none; padding:2px 8px 2px 0; }
.kv td:first-child { color:var(--muted); width:42%; }
.quant { margin-top:10px; font-size:12px; }
.note { color:var(--muted); font-size:12px; margin:6px 0 0; }
.empty { color:var(--muted); font-style:italic; }
svg text { font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,
  sans-serif; fill:#52606d; }
svg .bar { fill:var(--bar); } svg .bar:hover { fill:#1d5fa0; }
svg .axis { stroke:#9aa5b1; stroke-width:1; }
svg.hist { width:100%; height:auto; display:block; }
svg.hist text { font:10px system-ui,-apple-system,"Segoe UI",Roboto,Arial,
  sans-serif; fill:#52606d; }
.badge { white-space:nowrap; }
/* Quantiles: (share, value) pairs that wrap inside their card. */
.quant { display:flex; flex-wrap:wrap; gap:0; border:1px solid var(--line);
  border-radius:8px; overflow:hidden; background:#fff; }
.quant .q { flex:1 0 auto; min-width:3.6em; max-width:100%; display:flex;
  flex-direction:column; text-align:right; padding:3px 6px;
  font-variant-numeric:tabular-nums; overflow-wrap:anywhere; }
.quant .q b { font-size:11px; font-weight:600; color:var(--muted);
  background:#eef1f5; margin:-3px -6px 3px; padding:3px 6px; }
.toc { columns:4 200px; margin:0; padding:0 0 0 18px; }
.toc li { break-inside:avoid; }
"""

Stats = statistics_pb2.DatasetFeatureStatisticsList


def _e(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _fmt(value: Optional[float]) -> str:
  """Short human-readable number: 1,234 / 12.35 / 1.235e+15."""
  if value is None:
    return ''
  if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
    return str(value)
  if float(value).is_integer() and abs(value) < 1e12:
    return f'{int(value):,}'
  if abs(value) >= 1e6 or (value and abs(value) < 1e-3):
    return f'{value:.4g}'
  return f'{value:,.4f}'.rstrip('0').rstrip('.')


def _pct(part: float, whole: float) -> str:
  if not whole:
    return ''
  share = 100.0 * part / whole
  return '<0.1%' if 0 < share < 0.05 else f'{share:.1f}%'


def _fmt_time(micros: float) -> str:
  try:
    value = datetime.datetime.fromtimestamp(micros / 1e6,
                                            tz=datetime.timezone.utc)
  except (OverflowError, OSError, ValueError):
    return _fmt(micros)
  return value.strftime('%Y-%m-%d %H:%M:%S') + 'Z'


def _feature_name(feature) -> str:
  return '.'.join(feature.path.step) if feature.HasField('path') else (
      feature.name)


def _anchor(name: str) -> str:
  return 'f-' + ''.join(c if c.isalnum() or c in '-_' else '_' for c in name)


# Charts -----------------------------------------------------------------------
def _histogram_svg(buckets, fmt=_fmt, name: str = 'histogram') -> str:
  """Bars of a STANDARD (equal-width) histogram, drawn by matplotlib as
  the report's model plots are (pipelines.outputs.plots).

  Counts go on a log scale when one bucket dwarfs the typical one (a long
  tail or a few outliers would otherwise leave a single visible bar).
  TFDV interpolates these buckets from a quantile sketch, so empty value
  ranges get fractional counts; below half an example a bucket is drawn
  empty.
  """
  buckets = list(buckets)
  if not buckets:
    return '<p class="empty">no histogram</p>'
  counts = [b.sample_count if b.sample_count >= 0.5 else 0.0 for b in buckets]
  peak = max(counts) or 1.0
  filled = sorted(c for c in counts if c)
  log = bool(filled) and peak > 20 * filled[len(filled) // 2]
  lows = [b.low_value for b in buckets]
  widths = [b.high_value - b.low_value for b in buckets]
  fig, ax = plots.figure(4.2, 1.9)
  if all(w > 0 and math.isfinite(w) for w in widths):
    ax.bar(lows, counts, width=widths, align='edge', color=plots.ACCENT,
           linewidth=0)
  else:   # a constant or unbounded bucket: bars side by side
    ax.bar(range(len(counts)), counts, width=0.9, color=plots.ACCENT)
    ax.set_xticks([0, len(counts) - 1], [fmt(lows[0]),
                                         fmt(buckets[-1].high_value)])
  if log:
    ax.set_yscale('symlog', linthresh=1)
  ax.set_xlabel('value (equal-width buckets%s)' % (
      '; count on log scale' if log else ''))
  if fmt is not _fmt:   # times: the ends, as the table writes them
    ax.set_xticks([lows[0], buckets[-1].high_value],
                  [fmt(lows[0]), fmt(buckets[-1].high_value)])
  return plots.svg_of(fig, name, css_class='hist')


def _top_values_svg(values: Sequence, total: float, width=400) -> str:
  """Horizontal bars of the most frequent values, as a share of `total`."""
  if not values:
    return '<p class="empty">no values</p>'
  row, label_w, num_w = 18, 130, 90
  height = row * len(values) + 4
  bar_w = width - label_w - num_w
  peak = max(v.frequency for v in values) or 1.0
  parts = [f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="top values">']
  for i, v in enumerate(values):
    y = 2 + i * row
    label = v.value if len(v.value) <= 18 else v.value[:17] + '\u2026'
    w = max(bar_w * v.frequency / peak, 1.0)
    share = _e(_pct(v.frequency, total))
    parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">'
                 f'{_e(label)}<title>{_e(v.value)}</title></text>')
    parts.append(f'<rect class="bar" x="{label_w}" y="{y + 2}" '
                 f'width="{w:.1f}" height="{row - 5}"><title>'
                 f'{_e(v.value)}: {_e(_fmt(v.frequency))} ({share})</title>'
                 f'</rect>')
    parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">'
                 f'{_e(_fmt(v.frequency))} ({share})</text>')
  parts.append('</svg>')
  return ''.join(parts)


# Sections ---------------------------------------------------------------------
def _kv_table(pairs: Iterable) -> str:
  rows = ''.join(f'<tr><td>{_e(k)}</td><td class="num">{_e(v)}</td></tr>'
                 for k, v in pairs)
  return f'<table class="kv">{rows}</table>'


def _quantiles(num_stats, fmt) -> str:
  """The quantiles as a row of (share, value) pairs that wraps inside the
  card: each pair sizes to its value, so a long one never overflows."""
  for hist in num_stats.histograms:
    if hist.type == statistics_pb2.Histogram.QUANTILES and hist.buckets:
      bounds = [hist.buckets[0].low_value] + [b.high_value
                                              for b in hist.buckets]
      n = len(bounds) - 1
      pairs = ''.join(f'<span class="q"><b>{round(100 * i / n)}%</b>'
                      f'{_e(fmt(v))}</span>' for i, v in enumerate(bounds))
      return f'<div class="quant">{pairs}</div>'
  return ''


def _numeric_card(feature, num_examples, fmt) -> str:
  s = feature.num_stats
  c = s.common_stats
  pairs = [('count', _fmt(c.num_non_missing)),
           ('missing', f'{_fmt(c.num_missing)} '
                       f'({_pct(c.num_missing, num_examples) or "0%"})'),
           ('mean', fmt(s.mean)), ('std dev', _fmt(s.std_dev)),
           ('zeros', f'{_fmt(s.num_zeros)} '
                     f'({_pct(s.num_zeros, c.num_non_missing) or "0%"})'),
           ('min', fmt(s.min)), ('median', fmt(s.median)), ('max', fmt(s.max))]
  standard = [h for h in s.histograms
              if h.type == statistics_pb2.Histogram.STANDARD]
  chart = _histogram_svg(standard[0].buckets if standard else [], fmt,
                         'hist-' + _anchor(_feature_name(feature)))
  return (f'<div class="fbody"><div>{_kv_table(pairs)}'
          f'{_quantiles(s, fmt)}</div><div>{chart}</div></div>')


def _string_card(feature, num_examples) -> str:
  s = feature.string_stats
  c = s.common_stats
  pairs = [('count', _fmt(c.num_non_missing)),
           ('missing', f'{_fmt(c.num_missing)} '
                       f'({_pct(c.num_missing, num_examples) or "0%"})'),
           ('unique', _fmt(s.unique)), ('avg length', _fmt(s.avg_length))]
  note = ''
  if s.unique > _EXACT_TOPK_LIMIT:
    note = ('<p class="note">High cardinality: unique count and top-value '
            'frequencies are sketch estimates.</p>')
  chart = _top_values_svg(list(s.top_values), c.num_non_missing)
  return (f'<div class="fbody"><div>{_kv_table(pairs)}{note}</div>'
          f'<div>{chart}</div></div>')


def _feature_card(feature, num_examples, anomalies_by_feature,
                  timestamp_features) -> str:
  name = _feature_name(feature)
  found = anomalies_by_feature.get(name, [])
  severities = [a['severity'] for a in found]
  worst = next((s for s in ('ERROR', 'WARNING', 'INFO') if s in severities),
               None)
  badges = ''.join(f'<span class="badge {_e(a["severity"])}" '
                   f'title="{_e(a["description"])}">{_e(a["type"])}</span>'
                   for a in found)
  kind = statistics_pb2.FeatureNameStatistics.Type.Name(feature.type)
  fmt = _fmt_time if name in timestamp_features else _fmt
  if feature.HasField('num_stats'):
    body = _numeric_card(feature, num_examples, fmt)
  elif feature.HasField('string_stats'):
    body = _string_card(feature, num_examples)
  else:
    body = '<p class="empty">no statistics of a supported kind</p>'
  css = f' has-{worst}' if worst else ''
  return (f'<section class="feature{css}" id="{_anchor(name)}">'
          f'<div class="fhead"><h3>{_e(name)}</h3>'
          f'<span class="badge type">{_e(kind)}</span>{badges}</div>'
          f'{body}</section>')


def _anomalies_section(anomalies: List[Dict[str, Any]]) -> str:
  if not anomalies:
    return ('<h2>Anomalies</h2><p class="sub">'
            '<span class="badge OK">OK</span> no anomalies</p>')
  rows = ''.join(
      f'<tr><td><span class="badge {_e(a["severity"])}">'
      f'{_e(a["severity"])}</span></td>'
      f'<td class="mono"><a href="#{_anchor(str(a["feature"]))}">'
      f'{_e(a["feature"])}</a></td><td class="mono">{_e(a["type"])}</td>'
      f'<td>{_e(a["description"])}</td></tr>' for a in anomalies)
  return ('<h2>Anomalies</h2><table><tr><th>severity</th><th>feature</th>'
          f'<th>type</th><th>description</th></tr>{rows}</table>')


def _drift_section(result: Dict[str, Any]) -> str:
  kind = result.get('kind', 'drift')
  counts = result.get('num_examples', {})
  other = 'baseline' if kind == 'drift' else 'serving'
  title = 'Drift' if kind == 'drift' else 'Training/serving skew'
  rows = []
  for name, f in sorted(result.get('features', {}).items()):
    if f.get('value') is None:
      status = '<span class="badge INFO">NOT COMPARED</span>'
    elif f['drifted']:
      status = '<span class="badge WARNING">ABOVE THRESHOLD</span>'
    else:
      status = '<span class="badge OK">OK</span>'
    rows.append(
        f'<tr><td class="mono"><a href="#{_anchor(name)}">{_e(name)}</a></td>'
        f'<td>{_e(f.get("measure", ""))}</td>'
        f'<td class="num">{_e(_fmt(f.get("value")))}</td>'
        f'<td class="num">{_e(_fmt(f.get("threshold")))}</td>'
        f'<td>{status}</td></tr>')
  body = ''.join(rows) or (
      '<tr><td colspan="5" class="empty">no feature has a comparator</td>'
      '</tr>')
  return (f'<h2>{_e(title)}</h2><p class="sub">current '
          f'{_e(_fmt(counts.get("current")))} examples vs {_e(other)} '
          f'{_e(_fmt(counts.get("baseline")))}</p><table><tr><th>feature</th>'
          '<th>measure</th><th class="num">distance</th>'
          f'<th class="num">threshold</th><th>status</th></tr>{body}</table>')


def render_html(stats: Stats, anomalies: Optional[List[Dict[str, Any]]] = None,
                drift: Union[Dict[str, Any], List[Dict[str, Any]], None] = None,
                title: str = DEFAULT_TITLE,
                timestamp_features: Iterable[str] = ()) -> str:
  """The report page for the first (default) slice of `stats`.

  anomalies: `validation.validate` output; drift: a `validation.drift` or
  `validation.skew` result, or a list of them. `timestamp_features` hold
  epoch microseconds and are shown as UTC times.
  """
  dataset = stats.datasets[0] if stats.datasets else (
      statistics_pb2.DatasetFeatureStatistics())
  n = dataset.num_examples
  features = sorted(dataset.features, key=_feature_name)
  by_feature: Dict[str, List[Dict[str, Any]]] = {}
  for a in anomalies or []:
    by_feature.setdefault(str(a['feature']), []).append(a)
  counts = {s: sum(1 for a in anomalies or [] if a['severity'] == s)
            for s in ('ERROR', 'WARNING', 'INFO')}
  kpis = [('examples', _fmt(n)), ('features', _fmt(len(features)))]
  if anomalies is not None:
    kpis += [(f'{s.lower()}s', _fmt(c)) for s, c in counts.items()]
  cards = ''.join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span>'
                  '</div>' for k, v in kpis)
  toc = ''.join(f'<li><a class="mono" href="#{_anchor(_feature_name(f))}">'
                f'{_e(_feature_name(f))}</a></li>' for f in features)
  sections = []
  if anomalies is not None:
    sections.append(_anomalies_section(anomalies))
  drifts = [drift] if isinstance(drift, dict) else list(drift or [])
  sections.extend(_drift_section(d) for d in drifts)
  timestamp_features = set(timestamp_features)
  feature_cards = ''.join(_feature_card(f, n, by_feature, timestamp_features)
                          for f in features)
  subtitle = f'slice: {dataset.name}' if dataset.name else 'all examples'
  return (
      '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
      '<meta name="viewport" content="width=device-width, initial-scale=1">'
      f'<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>'
      f'<h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p>'
      f'<div class="cards">{cards}</div>{"".join(sections)}'
      f'<h2>Features</h2><ul class="toc">{toc}</ul>{feature_cards}'
      '</main></body></html>\n')


def write_html(path: str, stats: Stats,
               anomalies: Optional[List[Dict[str, Any]]] = None,
               drift: Union[Dict[str, Any], List[Dict[str, Any]], None] = None,
               title: str = DEFAULT_TITLE,
               timestamp_features: Iterable[str] = ()) -> str:
  """Writes `render_html(...)` to `path` (local or any Beam filesystem)."""
  page = render_html(stats, anomalies, drift, title, timestamp_features)
  with FileSystems.create(path, mime_type='text/html') as f:
    f.write(page.encode('utf-8'))
  return path


# Parts for other pages (pipelines.report) -------------------------------------
CSS = _CSS


def feature_cards(stats: Stats,
                  anomalies: Optional[List[Dict[str, Any]]] = None,
                  timestamp_features: Iterable[str] = ()) -> str:
  """The per-feature cards of `render_html` (id `f-<name>` each), for the
  first slice of `stats`."""
  dataset = stats.datasets[0] if stats.datasets else (
      statistics_pb2.DatasetFeatureStatistics())
  by_feature: Dict[str, List[Dict[str, Any]]] = {}
  for a in anomalies or []:
    by_feature.setdefault(str(a['feature']), []).append(a)
  timestamp_features = set(timestamp_features)
  return ''.join(_feature_card(f, dataset.num_examples, by_feature,
                               timestamp_features)
                 for f in sorted(dataset.features, key=_feature_name))


def anomalies_table(anomalies: List[Dict[str, Any]]) -> str:
  """The anomalies section of `render_html` (links to `feature_cards`)."""
  return _anomalies_section(anomalies)


def feature_anchor(name: str) -> str:
  return _anchor(name)
