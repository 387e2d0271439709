"""Risk bands and confidence: what a person acts on, from the declaration."""

import sys
import time

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from schemas.dataset import SchemaError, load_dataset
from transforms.inference import risk_bands

DATASET = load_dataset()
RISK = DATASET.risk


# No deadline: on a busy machine one example can take longer than
# Hypothesis' default 200 ms without anything being wrong.
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50))
def test_every_score_is_in_exactly_one_band(scores):
  scores = np.array(scores)
  category, confidence = risk_bands(scores, RISK)
  names = [n for n, _ in RISK['bands']]
  edges = [e for _, e in RISK['bands']] + [1.0]
  for score, got, conf in zip(scores, category.to_pylist(), confidence):
    inside = [n for n, lo, hi in zip(names, edges, edges[1:])
              if lo <= score < hi or (hi == 1.0 and score == 1.0 and
                                      lo <= score)]
    assert inside == [got]
    assert 0.0 <= conf <= 1.0


def test_the_band_property_survives_a_busy_machine(monkeypatch):
  """One example descheduled for 300 ms (a loaded CI machine) must not fail
  the property test: Hypothesis' default deadline called that a failure."""
  calls, bands = [], risk_bands

  def first_call_pauses(scores, risk):
    if not calls:
      time.sleep(0.3)
    calls.append(len(scores))
    return bands(scores, risk)

  monkeypatch.setattr(sys.modules[__name__], 'risk_bands', first_call_pauses)
  test_every_score_is_in_exactly_one_band()
  assert len(calls) > 1


def test_band_margin_confidence():
  # Bands low [0, .1), medium [.1, .4), high [.4, .8), critical [.8, 1].
  category, confidence = risk_bands(np.array([0.05, 0.25, 0.4, 0.79, 0.9]),
                                    RISK)
  assert category.to_pylist() == ['low', 'medium', 'high', 'high',
                                  'critical']
  # low and critical border one band each; medium and high two.
  np.testing.assert_allclose(confidence, [0.5, 1.0, 0.0, 0.05, 0.5])
  _, sure = risk_bands(np.array([0.0, 1.0]), RISK)
  np.testing.assert_allclose(sure, [1.0, 1.0])


def test_bands_are_ordered_by_edge_not_by_writing(tmp_path):
  import yaml
  with open(DATASET.path) as f:
    raw = yaml.safe_load(f)
  path = tmp_path / 'sorted.yaml'
  path.write_text(yaml.safe_dump(raw, sort_keys=True))   # critical first
  assert load_dataset(str(path)).risk == RISK


def test_probability_confidence():
  category, confidence = risk_bands(
      np.array([0.05, 0.5, 0.9]), dict(RISK, confidence='probability'))
  np.testing.assert_allclose(confidence, [0.95, 0.5, 0.9])


@pytest.mark.parametrize('bands,message', [
    ({'low': 0.1, 'high': 0.5}, 'the lowest band must start at 0'),
    ({'low': 0.0, 'high': 0.5, 'mid': 0.5}, 'two bands start at the same'),
    ({'low': 0.0, 'high': 1.5}, "risk.bands.high: 1.5 is not a score edge"),
    ({'low': 0.0}, 'needs at least two bands'),
])
def test_bad_bands_are_one_line(tmp_path, bands, message):
  import yaml
  with open(DATASET.path) as f:
    raw = yaml.safe_load(f)
  raw['risk']['bands'] = bands
  path = tmp_path / 'bad.yaml'
  path.write_text(yaml.safe_dump(raw, sort_keys=False))
  with pytest.raises(SchemaError, match=message):
    load_dataset(str(path))
