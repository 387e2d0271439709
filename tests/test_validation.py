"""Tests of pipelines.validation.checks (anomalies, drift, skew, gate), the report."""

import html.parser
import json
import os
import re

import pipelines.base.quiet  # noqa: F401  (before TensorFlow)
import numpy as np
import pandas as pd
import pytest
import tensorflow_data_validation as tfdv

from pipelines.synthetic.transactions import generate_transactions
from pipelines.validation import checks as validation
from pipelines.validation import quantile_drift, stats_report
from tests.test_statistics import DATASET, TYPES, compute_stats
from transforms.statistics import stats_options

SCHEMA = DATASET.tfdv_schema()
SOFT = validation.soft_domain_features(DATASET)
COMPARED = sorted(DATASET.drift)


@pytest.fixture(scope='module')
def stats(tmp_path_factory):
  """Statistics of every table the tests need, from one pipeline run."""
  return compute_stats({
      'empty': [],
      'clean': {'n': 1000, 'seed': 1},
      'unlabelled': {'n': 1000, 'seed': 1,
                     'edits': {i: {'is_fraud': None} for i in range(50)}},
      'new_country': {'n': 1000, 'seed': 1, 'edits': {7: {'country': 'ZZ'}}},
      'new_currency': {'n': 1000, 'seed': 1,
                       'edits': {7: {'currency': 'JPY'}}},
      'missing_required': {'n': 1000, 'seed': 1,
                           'edits': {3: {'merchant_id': None},
                                     4: {'user_id_count_24h': None}}},
      'out_of_range': {'n': 1000, 'seed': 1,
                       'edits': {9: {'amount': 99999.0}}},
      'baseline': {'n': 4000, 'seed': 10},
      'resample': {'n': 4000, 'seed': 11},
      'shifted': {'n': 4000, 'seed': 12, 'amount_scale': 4.0},
  }, tmp_path_factory.mktemp('stats'))


def by_feature(anomalies):
  out = {}
  for a in anomalies:
    out.setdefault(a['feature'], []).append((a['type'], a['severity']))
  return out


# Anomalies --------------------------------------------------------------------
def test_clean_table_has_no_anomalies(stats):
  assert validation.validate(stats['clean'], SCHEMA, soft_domains=SOFT) == []
  # The label is optional: rows without one are not an anomaly.
  assert validation.validate(stats['unlabelled'], SCHEMA,
                             soft_domains=SOFT) == []


def test_empty_data_is_an_error_and_is_not_compared(stats):
  assert stats['empty'].datasets[0].num_examples == 0
  found = validation.validate(stats['empty'], SCHEMA, soft_domains=SOFT)
  assert by_feature(found) == {'*dataset*': [('NO_DATA_IN_SPAN', 'ERROR')]}
  result = validation.drift(stats['empty'], stats['baseline'], SCHEMA)
  assert sorted(result['features']) == COMPARED
  amount = result['features']['amount']
  assert amount['value'] is None and amount['drifted'] is False
  assert amount['threshold'] == pytest.approx(0.1)
  assert 'FLOAT' not in stats_report.render_html(stats['empty'], found)


def test_new_category_in_soft_domain_is_a_warning(stats):
  found = by_feature(validation.validate(stats['new_country'], SCHEMA,
                                         soft_domains=SOFT))
  assert found == {'country': [('ENUM_TYPE_UNEXPECTED_STRING_VALUES',
                                'WARNING')]}
  # Without the soft-domain list every string domain is hard.
  found = by_feature(validation.validate(stats['new_country'], SCHEMA))
  assert found == {'country': [('ENUM_TYPE_UNEXPECTED_STRING_VALUES',
                                'ERROR')]}


def test_value_outside_hard_domain_is_an_error(stats):
  anomalies = validation.validate(stats['new_currency'], SCHEMA,
                                  soft_domains=SOFT)
  assert by_feature(anomalies) == {
      'currency': [('ENUM_TYPE_UNEXPECTED_STRING_VALUES', 'ERROR')]}
  assert 'JPY' in anomalies[0]['description']


def test_missing_required_feature_is_an_error(stats):
  found = by_feature(validation.validate(stats['missing_required'], SCHEMA,
                                         soft_domains=SOFT))
  assert found == {
      'merchant_id': [('FEATURE_TYPE_LOW_FRACTION_PRESENT', 'ERROR')],
      'user_id_count_24h': [('FEATURE_TYPE_LOW_FRACTION_PRESENT', 'ERROR')]}


def test_out_of_range_value_is_an_error(stats):
  anomalies = validation.validate(stats['out_of_range'], SCHEMA,
                                  soft_domains=SOFT)
  assert by_feature(anomalies) == {
      'amount': [('FLOAT_TYPE_BIG_FLOAT', 'ERROR')]}
  assert '25000' in anomalies[0]['description']


def test_severity_mapping_covers_the_cases_that_matter():
  sev = validation.SEVERITY_BY_TYPE
  for kind in ('SCHEMA_MISSING_COLUMN', 'FEATURE_TYPE_LOW_FRACTION_PRESENT',
               'FLOAT_TYPE_BIG_FLOAT', 'INT_TYPE_SMALL_INT',
               'ENUM_TYPE_UNEXPECTED_STRING_VALUES'):
    assert sev[kind] == 'ERROR'
  for kind in ('COMPARATOR_L_INFTY_HIGH',
               'COMPARATOR_JENSEN_SHANNON_DIVERGENCE_HIGH'):
    assert sev[kind] == 'WARNING'
  assert validation.soft_domain_features(DATASET) == ['country']
  # Every name is a real TFDV anomaly type.
  from tensorflow_metadata.proto.v0 import anomalies_pb2
  known = set(anomalies_pb2.AnomalyInfo.Type.keys())
  assert set(sev) <= known, set(sev) - known


def test_write_anomalies(stats, tmp_path):
  proto = validation.detect(stats['missing_required'], SCHEMA,
                            baseline_stats=stats['clean'])
  found = validation.anomaly_list(proto, SOFT)
  paths = validation.write_anomalies(proto, found, str(tmp_path / 'out'))
  assert tfdv.load_anomalies_text(paths['pbtxt']) == proto
  with open(paths['json']) as f:
    body = json.load(f)
  assert body['counts'] == {'ERROR': 2, 'WARNING': 0, 'INFO': 0}
  assert body['anomalies'] == found


# Gate -------------------------------------------------------------------------
def test_gate_raises_on_errors_only_when_enabled(stats):
  anomalies = validation.validate(stats['out_of_range'], SCHEMA,
                                  soft_domains=SOFT)
  with pytest.raises(validation.DataValidationError) as raised:
    validation.gate(anomalies, fail_on_anomalies=True)
  assert 'amount: FLOAT_TYPE_BIG_FLOAT' in str(raised.value)
  assert raised.value.anomalies == anomalies
  assert validation.gate(anomalies, fail_on_anomalies=False) == anomalies
  warnings_only = validation.validate(stats['new_country'], SCHEMA,
                                      soft_domains=SOFT)
  assert validation.gate(warnings_only, fail_on_anomalies=True) == []


def test_run_writes_every_output_before_it_gates(stats, tmp_path):
  out = tmp_path / 'failed'
  with pytest.raises(validation.DataValidationError):
    validation.run(stats['out_of_range'], DATASET, str(out),
                   baseline_stats=stats['baseline'],
                   serving_stats=stats['resample'])
  assert sorted(os.listdir(out)) == [
      'anomalies.json', 'anomalies.pbtxt', 'drift.json', 'skew.json',
      'stats.html']
  result = validation.run(stats['new_country'], DATASET, str(tmp_path / 'ok'))
  assert result['counts'] == {'ERROR': 0, 'WARNING': 1, 'INFO': 0}
  assert result['drift'] is None
  assert sorted(result['paths']) == ['html', 'json', 'pbtxt']


# Drift and skew ---------------------------------------------------------------
def test_shifted_amount_drifts_and_a_resample_does_not(stats, tmp_path):
  same = validation.drift(stats['resample'], stats['baseline'], SCHEMA)
  assert sorted(same['features']) == COMPARED
  for name, f in same['features'].items():
    assert f['value'] is not None and 0.0 <= f['value'] < f['threshold'], (
        name, f)
    assert f['drifted'] is False
  assert same['drifted'] == []
  assert same['features']['amount']['measure'] == 'jensen_shannon_distance'
  assert same['features']['country']['measure'] == 'l_infinity'
  assert same['num_examples'] == {'current': 4000, 'baseline': 4000}

  moved = validation.drift(stats['shifted'], stats['baseline'], SCHEMA)
  assert sorted(moved['features']) == COMPARED
  assert moved['drifted'] == ['amount']
  amount = moved['features']['amount']
  assert amount['value'] > amount['threshold'] == pytest.approx(0.1)
  assert amount['value'] > 5 * same['features']['amount']['value']

  path = validation.write_drift(moved, str(tmp_path / 'drift.json'))
  with open(path) as f:
    assert json.load(f) == moved

  # The same shift, seen by validate, is a WARNING, not an ERROR.
  found = validation.validate(stats['shifted'], SCHEMA, soft_domains=SOFT,
                              baseline_stats=stats['baseline'])
  assert by_feature(found) == {
      'amount': [('COMPARATOR_JENSEN_SHANNON_DIVERGENCE_HIGH', 'WARNING')]}


@pytest.fixture(scope='module')
def generated():
  """Statistics of the generator's records (seed 1, seed 2, and seed 2 with
  the amounts of every odd-numbered user tripled), with the pipeline's
  StatsOptions, computed in memory: about a second, no Beam pipeline."""
  frames = {seed: pd.DataFrame(generate_transactions(rows=30000, seed=seed))
            for seed in (1, 2)}
  tripled = frames[2].copy()
  odd = tripled['user_id'].str[1:].astype(int) % 2 == 1
  tripled.loc[odd, 'amount'] *= 3
  options = stats_options(DATASET)
  return {name: tfdv.generate_statistics_from_dataframe(frame, options,
                                                         n_jobs=1)
          for name, frame in (('seed1', frames[1]), ('seed2', frames[2]),
                              ('tripled', tripled))}


def test_drift_separates_a_resample_from_tripled_amounts(generated):
  threshold = DATASET.drift['amount']['jensen_shannon']
  # TFDV's own measure, on equal-width buckets set by the extremes, puts
  # two seeds of one generator over the threshold: why we measure our own.
  tfdv_says = tfdv.validate_statistics(generated['seed2'], SCHEMA,
                                       previous_statistics=generated['seed1'])
  tfdv_js = {'.'.join(i.path.step): i.drift_measurements[0].value
             for i in tfdv_says.drift_skew_info}
  assert tfdv_js['amount'] > threshold

  same = validation.drift(generated['seed2'], generated['seed1'], SCHEMA)
  amount = same['features']['amount']
  assert amount['value'] < threshold / 4 and same['drifted'] == []
  assert amount['measure'] == 'jensen_shannon_distance'
  moved = validation.drift(generated['tripled'], generated['seed1'], SCHEMA)
  assert moved['drifted'] == ['amount']
  assert moved['features']['amount']['value'] > 2 * threshold
  # Skew is the same measure with the training data as the baseline.
  assert validation.skew(generated['seed1'], generated['tripled'],
                         SCHEMA)['drifted'] == ['amount']
  assert validation.skew(generated['seed1'], generated['seed2'],
                         SCHEMA)['drifted'] == []

  # validate() and the anomalies file agree with drift.json.
  def comparator_anomalies(current, **kw):
    return [(a['feature'], a['severity']) for a in validation.validate(
        generated[current], SCHEMA, soft_domains=SOFT, **kw)
            if a['type'].startswith('COMPARATOR_')]
  assert comparator_anomalies('seed2', baseline_stats=generated['seed1']) == []
  assert comparator_anomalies('tripled', baseline_stats=generated['seed1']
                              ) == [('amount', 'WARNING')]
  assert comparator_anomalies('seed1', serving_stats=generated['tripled']
                              ) == [('amount', 'WARNING')]


def test_quantile_cdf_and_bins_by_hand():
  # Four equal buckets with boundaries 0, 0, 0, 1, 3: half the values are
  # 0 (two buckets), a quarter in (0, 1], a quarter in (1, 3].
  points = (np.array([0.0, 0.0, 0.0, 1.0, 3.0]),
            np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
  np.testing.assert_allclose(
      quantile_drift.cdf(points, [-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0]),
      [0.0, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0])
  # Bins (-inf, 0], (0, 2], (2, inf): 0.5, 0.875 - 0.5, 1 - 0.875.
  np.testing.assert_allclose(
      quantile_drift.bin_shares(points, np.array([0.0, 2.0])),
      [0.5, 0.375, 0.125])


def test_training_serving_skew(stats):
  result = validation.skew(stats['baseline'], stats['shifted'], SCHEMA)
  assert result['kind'] == 'skew'
  assert sorted(result['features']) == COMPARED
  assert result['drifted'] == ['amount']
  result = validation.skew(stats['baseline'], stats['resample'], SCHEMA)
  assert result['drifted'] == []


# HTML report ------------------------------------------------------------------
class _TagBalance(html.parser.HTMLParser):
  """Counts unclosed elements (void elements excluded)."""
  VOID = {'meta', 'br', 'hr', 'img', 'input', 'link', 'rect', 'line'}

  def __init__(self):
    super().__init__()
    self.stack = []

  def handle_starttag(self, tag, attrs):
    if tag not in self.VOID:
      self.stack.append(tag)

  def handle_startendtag(self, tag, attrs):
    pass

  def handle_endtag(self, tag):
    if tag in self.VOID:
      return
    assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
    self.stack.pop()


def test_html_report_is_self_contained(stats, tmp_path):
  anomalies = validation.validate(stats['out_of_range'], SCHEMA,
                                  soft_domains=SOFT,
                                  baseline_stats=stats['baseline'])
  drifted = validation.drift(stats['shifted'], stats['baseline'], SCHEMA)
  skewed = validation.skew(stats['baseline'], stats['resample'], SCHEMA)
  page = stats_report.render_html(
      stats['out_of_range'], anomalies, [drifted, skewed],
      title='Report <test>', timestamp_features=['event_time'])
  # Nothing to fetch: no scripts, stylesheets, images or web addresses.
  # (url(#id): a clip path of the page's own SVG, nothing fetched)
  assert not re.search(r'<script|<link|<img|<iframe|\bsrc=|@import|url\((?!#)',
                       page, re.I)
  assert not re.search(r'https?://', page)
  assert 'Report &lt;test&gt;' in page
  for name in TYPES:
    assert f'id="f-{name}"' in page and f'>{name}</h3>' in page
  for a in anomalies:
    assert f'<td class="mono">{a["type"]}</td>' in page
  assert 'FLOAT_TYPE_BIG_FLOAT' in page and 'ABOVE THRESHOLD' in page
  assert page.count('<svg') == len(TYPES)
  # Numeric histograms are matplotlib's, as the report's model plots.
  numeric = sum(f.HasField('num_stats')
                for f in stats['out_of_range'].datasets[0].features)
  assert page.count('<svg class="hist"') == numeric > 0
  assert '2023-11-14 22:13:20Z' in page   # event_time min as UTC time
  balance = _TagBalance()
  balance.feed(page)
  assert balance.stack == []

  path = stats_report.write_html(str(tmp_path / 'report' / 'stats.html'),
                                 stats['out_of_range'], anomalies, drifted)
  with open(path, encoding='utf-8') as f:
    assert f.read().startswith('<!DOCTYPE html>')


def test_html_escapes_values_from_the_data(tmp_path):
  hostile = '<script>alert("x")</script>'
  edits = {i: {'merchant_id': hostile} for i in range(300)}  # a top value
  edits[0]['country'] = 'ZZ'
  stats = compute_stats({'t': {'n': 3000, 'edits': edits}}, tmp_path)['t']
  page = stats_report.render_html(stats)
  assert '<script' not in page
  assert html.escape(hostile) in page
  assert '&lt;0.1%' in page   # ZZ's share of the countries
  # Every '<' left in the page opens a tag: all text was escaped.
  assert not re.findall(r'<(?![a-zA-Z/!])', page)
