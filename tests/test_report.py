"""The run report: rendered in headless Chromium (no console error, no
network request, a screenshot), its sections per kind of run, its curves,
and that it is static and deterministic."""

import json
import re
import shutil

import pytest

from pipelines import report as report_command
from pipelines.reporting import report
from tests.browser import Browser

EVERY_SECTION = ['summary', 'stages', 'records', 'anomalies', 'drift',
                 'model', 'importance', 'curves', 'calibration', 'scores', 'risk',
                 'registry', 'monitoring', 'features', 'history', 'outputs']
MODEL_SECTIONS = {'model', 'importance', 'curves', 'calibration', 'scores', 'risk',
                  'registry', 'monitoring'}

# monitoring/report.json as pipelines.monitor writes it (its documented
# keys), values made up.
MONITORING = {
    'model': {'version': 'v-made-up', 'task': 'binary', 'threshold': 0.3},
    'counts': {'predictions': 1500, 'labels': 1400, 'matched': 1400,
               'positives': 21},
    'metrics': {'roc_auc': 0.91, 'pr_auc': 0.5, 'precision': 0.6,
                'recall': 0.5, 'brier': 0.012},
    'calibration': [{'lower': b / 10, 'upper': (b + 1) / 10,
                     'count': 100 - b, 'mean_score': b / 10 + 0.05,
                     'positive_rate': b / 10} for b in range(10)],
    'eval_metrics': {'roc_auc': 0.95, 'pr_auc': 0.6, 'precision': 0.7,
                     'recall': 0.6, 'brier': 0.01},
    'change': {'roc_auc': -0.04, 'pr_auc': -0.1, 'precision': -0.1,
               'recall': -0.1, 'brier': 0.002},
    'trend': {'by': 'UTC day', 'rows_without_time': 0, 'days': [
        {'date': '2026-11-01', 'rows': 700, 'positives': 10,
         'roc_auc': 0.9, 'mean_score': 0.02}]},
    'score_drift': {'rows': 1500, 'js_distance': 0.12, 'psi': 0.3},
}


@pytest.fixture(scope='module')
def browser():
  with Browser() as b:
    yield b


def _clean_load(page, path):
  """The page loaded itself and nothing else, with no error."""
  assert page.requests == ['file://' + str(path)]
  assert page.console_errors == []
  assert page.exceptions == []


def test_full_run_report_has_every_section_in_chromium(report_runs, browser,
                                                       tmp_path):
  out = report_runs.full
  # The run's own report: everything but monitoring (no monitor ran yet).
  page = browser.open(str(out / 'report' / 'index.html'),
                      str(tmp_path / 'full-run.png'))
  _clean_load(page, out / 'report' / 'index.html')
  assert page.sections == [s for s in EVERY_SECTION if s != 'monitoring']
  # ROC, PR, calibration, scores, importance; the log-FPR ROC beside the
  # linear one when the eval AUC is above 0.95.
  metadata = json.loads((out / 'model' / 'metadata.json').read_text())
  log_roc = metadata['metrics']['eval']['roc_auc'] > 0.95
  assert page.visible_plots == 5 + log_roc
  assert ('aria-label="roc-log"' in (out / 'report' / 'index.html')
          .read_text()) == log_roc
  # Layout: no badge broken over lines, no quantile row past its card,
  # a matplotlib histogram in every numeric feature's card.
  assert page.wrapped_badges == 0
  assert page.overflowing_quantiles == 0
  assert page.histograms > 10

  # After pipelines.monitor: `python -m pipelines.report` adds monitoring.
  (out / 'monitoring').mkdir()
  try:
    (out / 'monitoring' / 'report.json').write_text(json.dumps(MONITORING))
    assert report_command.main(['--output_dir', str(out)]) == 0
    shot = tmp_path / 'full-run-with-monitoring.png'
    page = browser.open(str(out / 'report' / 'index.html'), str(shot))
    _clean_load(page, out / 'report' / 'index.html')
    assert page.sections == EVERY_SECTION
    assert page.visible_plots == 6 + log_roc
    assert page.title == 'transactions: run report'
    assert shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert shot.stat().st_size > 50_000
    text = (out / 'report' / 'index.html').read_text()
    assert 'v-made-up' in text and '0.1200' in text   # version, JS distance
  finally:
    shutil.rmtree(out / 'monitoring')
    report_command.main(['--output_dir', str(out)])


def test_features_only_run_has_no_model_sections(report_runs, browser,
                                                 tmp_path):
  out = report_runs.features_only
  path = out / 'report' / 'index.html'
  page = browser.open(str(path), str(tmp_path / 'features-only.png'))
  _clean_load(page, path)
  assert page.sections == ['summary', 'stages', 'records', 'anomalies',
                           'features', 'history', 'outputs']
  assert page.visible_plots == 0
  assert 'validation: no label declared' in path.read_text()


def test_stopped_and_scoring_only_runs_show_what_they_did(report_runs,
                                                          browser, tmp_path):
  stopped = report_runs.stopped / 'report' / 'index.html'
  page = browser.open(str(stopped), str(tmp_path / 'stopped.png'))
  _clean_load(page, stopped)
  assert not MODEL_SECTIONS & set(page.sections)
  assert {'summary', 'records', 'anomalies', 'features'} <= set(page.sections)
  text = stopped.read_text()
  assert 'STOPPED: ERROR ANOMALIES' in text
  assert 'DATASET_LOW_NUM_EXAMPLES' in text

  scored = report_runs.drifted / 'report' / 'index.html'
  page = browser.open(str(scored), str(tmp_path / 'scoring-only.png'))
  _clean_load(page, scored)
  # Scored with a model trained elsewhere: no registry entry, and no eval
  # curves (the model stores none; its eval rows are the other run's).
  assert page.sections == ['summary', 'stages', 'records', 'anomalies',
                           'drift', 'model', 'importance', 'calibration',
                           'scores', 'risk', 'features', 'history', 'outputs']
  text = scored.read_text()
  assert 'Drift against --baseline_stats' in text
  assert 'Training/serving skew' in text
  assert 'ABOVE THRESHOLD' in text


def test_dead_letter_examples_are_the_first_of_each_kind(report_runs):
  out = report_runs.full
  rows = [json.loads(line) for path in sorted(out.glob('dead_letter/*.jsonl'))
          for line in path.read_text().splitlines()]
  examples = report.dead_letter_examples(str(out))
  summary = report_runs.summary['full']
  assert set(examples) == set(summary['dead_letter_by_kind'])
  for kind, shown in examples.items():
    mine = sorted((r for r in rows if r['error_kind'] == kind),
                  key=lambda r: (r['source_file'], r['position']))
    assert shown == mine[:3]
  text = (out / 'report' / 'index.html').read_text()
  first = examples['malformed'][0]
  assert f'#{first["position"]}</span>' in text


def test_a_run_folder_with_glob_characters_reports_its_own_rows(tmp_path):
  # --output_dir 'out/run[1]' must not show the rows of its sibling
  # out/run1 (the folder is a name, not a pattern).
  for folder, kind in (('run[1]', 'malformed'), ('run1', 'type_error')):
    (tmp_path / folder / 'dead_letter').mkdir(parents=True)
    (tmp_path / folder / 'dead_letter' / 'part-0.jsonl').write_text(
        json.dumps({'error_kind': kind, 'position': 1}) + '\n')
  examples = report.dead_letter_examples(str(tmp_path / 'run[1]'))
  assert examples == {'malformed': [{'error_kind': 'malformed',
                                     'position': 1}]}


def test_curves_are_of_the_models_eval_split(report_runs):
  from sklearn.metrics import auc
  out = report_runs.full
  metadata = json.loads((out / 'model' / 'metadata.json').read_text())
  curves = report.eval_curves(str(out), metadata)
  expected = metadata['metrics']['eval']
  # Same split and model as training: the same AUC, from the points too.
  assert curves['roc_auc'] == pytest.approx(expected['roc_auc'], abs=1e-12)
  assert auc(curves['roc']['fpr'], curves['roc']['tpr']) == pytest.approx(
      expected['roc_auc'], abs=1e-12)
  assert curves['rows'] == expected['rows']
  assert curves['positives'] == expected['positives']
  # Points stored with a model win over recomputing them.
  stored = {'roc': {'fpr': [0, 1], 'tpr': [0, 1]},
            'pr': {'precision': [1, 0], 'recall': [0, 1]}, 'roc_auc': 0.5}
  metadata['metrics']['eval']['curves'] = stored
  assert report.eval_curves(str(out), metadata)['roc_auc'] == 0.5


def test_report_is_static_and_deterministic(report_runs):
  for name in ('full', 'drifted', 'features_only', 'stopped'):
    out = str(getattr(report_runs, name))
    page = report.render(out, None, str(report_runs.history))
    assert page == report.render(out, None, str(report_runs.history))
    assert '<script' not in page.lower()
    assert '://' not in page     # no URL at all: nothing to fetch
    assert not re.search(r'\ssrc=', page)
    assert not re.search(r'url\((?!#)', page)   # only in-page references
    assert '@import' not in page and '<link' not in page
    for href in re.findall(r'href="([^"]*)"', page):
      assert href.startswith('#') or not re.match(r'^[a-z]+:', href), href
    # Plot ids are unique on the page (several SVGs inline).
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert '<dc:date>' not in page


def test_console_summary_ends_with_the_report_path(report_runs):
  for name in ('full', 'drifted', 'features_only', 'stopped'):
    lines = report_runs.stdout[name].strip().splitlines()
    path = getattr(report_runs, name) / 'report' / 'index.html'
    assert lines[-1] == f'Report:                {path}'
    assert path.exists()
  assert report_runs.codes == {'features_only': 0, 'full': 0, 'drifted': 0,
                               'stopped': 1}


def test_the_browser_check_sees_requests_and_console_errors(browser,
                                                            tmp_path):
  # The checks above can fail: a page that fetches and logs is caught.
  page_path = tmp_path / 'bad.html'
  page_path.write_text(
      '<!DOCTYPE html><html><head><title>bad</title></head><body>'
      '<img src="http://127.0.0.1:9/pixel.png">'
      '<script>console.error("boom"); undefinedCall();</script>'
      '</body></html>')
  page = browser.open(str(page_path))
  assert 'http://127.0.0.1:9/pixel.png' in page.requests
  assert any('boom' in e for e in page.console_errors)
  assert page.exceptions
