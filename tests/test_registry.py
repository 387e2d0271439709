"""The model registry: statuses, promotion, rollback, crash safety, and the
batch job training into it and scoring with its champion."""

import hashlib
import json
import os

import pytest

from pipelines import batch
from pipelines import generate
from pipelines.model import registry as registry_lib
from transforms import inference
from pipelines.model.registry import (CANDIDATE, CHAMPION, RETIRED, Registry,
                                RegistryError)


def _model(tmp_path, version, auc):
  """A model folder as verify_model_dir checks it (files and digests)."""
  folder = tmp_path / f'model-{version}'
  folder.mkdir()
  data = f'estimator {version}'.encode()
  (folder / 'model.skops').write_bytes(data)
  (folder / 'metadata.json').write_text(json.dumps({
      'model_version': version, 'model_type': 'gbt', 'task': 'binary',
      'metrics': {'eval': {'roc_auc': auc}},
      'files': {'model.skops': hashlib.sha256(data).hexdigest()}}))
  return str(folder)


def test_first_is_champion_then_candidates_promote_and_rollback(tmp_path):
  r = Registry(str(tmp_path / 'reg'))
  first = r.register(_model(tmp_path, 'v1', 0.9), 'first', at='t1')
  assert first['status'] == CHAMPION
  second = r.register(_model(tmp_path, 'v2', 0.95), 'second', at='t2')
  assert second['status'] == CANDIDATE
  assert r.champion()['version'] == 'v1'
  # Registering a version again changes nothing.
  r.register(str(tmp_path / 'model-v2'), 'again', at='t3')
  assert [e['version'] for e in r.entries()] == ['v1', 'v2']

  r.promote('v2', 'better', at='t4')
  assert {e['version']: e['status'] for e in r.entries()} == {
      'v1': RETIRED, 'v2': CHAMPION}
  assert r.champion_dir().endswith('models/v2')
  assert os.path.exists(os.path.join(r.champion_dir(), 'model.skops'))
  r.rollback('alerts', at='t5')
  assert r.champion()['version'] == 'v1'
  assert r.get('v2')['status'] == RETIRED
  # The history says when and why, in order.
  assert [(h['status'], h['at']) for h in r.get('v1')['history']] == [
      (CANDIDATE, 't1'), (CHAMPION, 't1'), (RETIRED, 't4'), (CHAMPION, 't5')]
  # A rolled-back champion is not brought back by a second rollback.
  with pytest.raises(RegistryError, match='no predecessor'):
    r.rollback('again')
  # Each champion change left a pointer for streaming jobs to watch.
  pointers = sorted(os.listdir(tmp_path / 'reg' / 'promotions'))
  assert pointers == ['000001.json', '000002.json', '000003.json']
  assert json.loads((tmp_path / 'reg' / 'promotions' / '000003.json')
                    .read_text())['version'] == 'v1'


def test_a_crash_mid_promotion_leaves_the_old_index(tmp_path, monkeypatch):
  r = Registry(str(tmp_path / 'reg'))
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  r.register(_model(tmp_path, 'v2', 0.95), 'second')
  before = (tmp_path / 'reg' / 'index.json').read_bytes()

  def crash(src, dst):
    raise OSError('power cut')
  monkeypatch.setattr(registry_lib.files.os, 'replace', crash)
  with pytest.raises(OSError):
    r.promote('v2', 'better')
  monkeypatch.undo()
  assert (tmp_path / 'reg' / 'index.json').read_bytes() == before
  assert Registry(str(tmp_path / 'reg')).champion()['version'] == 'v1'


def test_command_line(tmp_path, capsys):
  root = str(tmp_path / 'reg')
  r = Registry(root)
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  r.register(_model(tmp_path, 'v2', 0.95), 'second')
  assert registry_lib.main(['list', '--registry', root]) == 0
  listing = capsys.readouterr().out
  assert 'v1' in listing and 'champion' in listing and 'roc_auc 0.9500' in \
      listing
  assert registry_lib.main(['promote', 'v9', '--registry', root]) == 2
  assert 'holds no version v9' in capsys.readouterr().err
  assert registry_lib.main(['promote', 'v2', '--registry', root,
                            '--reason', 'better']) == 0
  assert Registry(root).champion()['version'] == 'v2'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('registry_runs')
  paths = []
  for seed in (1, 2):
    path = tmp / f'tx{seed}.jsonl'
    assert generate.run(['--output', str(path), '--rows', '3000', '--seed',
                         str(seed)]) == 0
    paths.append(str(path))
  root = str(tmp / 'registry')
  # The second run compares two model types and registers the better.
  summaries = [batch.run(['--input', p, '--output_dir', str(tmp / f'out{i}'),
                          '--registry', root] + (
                              ['--model_type', 'gbt,logreg'] if i else []))
               for i, p in enumerate(paths)]
  return tmp, root, paths, summaries


def test_training_runs_register_and_the_champion_scores(trained):
  tmp, root, _, (first, second) = trained
  assert first['registry']['status'] == CHAMPION
  assert second['registry']['status'] == CANDIDATE
  assert second['registry']['champion'] == first['registry']['registered']
  # The second run trained a candidate, but the champion scored.
  assert second['model']['version'] == first['model']['version']
  entries = Registry(root).entries()
  assert [e['version'] for e in entries] == [
      first['registry']['registered'], second['registry']['registered']]
  assert entries[0]['data_hash'] and entries[0]['declaration_hash']
  assert entries[0]['metrics']['roc_auc'] == pytest.approx(
      first['model']['metrics']['eval']['roc_auc'])


def test_scoring_follows_a_promotion(trained):
  tmp, root, paths, (_, second) = trained
  new = second['registry']['registered']
  assert registry_lib.main(['promote', new, '--registry', root]) == 0
  scored = batch.run(['--input', paths[0], '--output_dir',
                      str(tmp / 'scored'), '--registry', root, '--no-train'])
  assert scored['model']['version'] == new
  assert not scored['model']['trained_in_this_run']


def test_no_train_without_a_champion_is_one_line(tmp_path, capsys):
  code = batch.main(['--output_dir', str(tmp_path / 'o'), '--registry',
                     str(tmp_path / 'empty'), '--no-train'])
  assert code == 2
  assert 'has no champion model yet' in capsys.readouterr().err


def test_a_champion_pointer_names_the_model_dir(tmp_path):
  from transforms.inference import ModelIntegrityError, model_dir_of
  r = Registry(str(tmp_path / 'reg'))
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  pointer = tmp_path / 'reg' / 'promotions' / '000001.json'
  assert model_dir_of(str(pointer)) == r.champion_dir()
  assert model_dir_of(str(tmp_path / 'm' / 'metadata.json')) == str(
      tmp_path / 'm')
  bad = tmp_path / 'bad.json'
  bad.write_text('[1, 2]')
  with pytest.raises(ModelIntegrityError, match='not a champion pointer'):
    model_dir_of(str(bad))


def test_streaming_scores_with_the_champion(trained, tmp_path):
  from pipelines import streaming
  tmp, root, paths, _ = trained
  with open(paths[0]) as f:
    head = [next(f) for _ in range(120)]
  small = tmp_path / 'head.jsonl'
  small.write_text(''.join(head))
  out = tmp_path / 'stream'
  summary = streaming.run(['--input', str(small), '--output_dir', str(out),
                           '--registry', root, '--replay_batch', '60'])
  champion = Registry(root).champion()['version']
  rows = [json.loads(line) for path in (out / 'streaming' /
                                        'predictions').glob('*.jsonl')
          for line in path.read_text().splitlines()]
  assert len(rows) == summary['records_valid'] > 100
  assert {r['model_version'] for r in rows} == {champion}


def test_the_best_model_type_is_kept_with_the_others_beside_it(trained):
  tmp, root, _, (_, second) = trained
  out = tmp / 'out1'
  metadata = inference.read_metadata(str(out / 'model'))
  table = metadata['compared']
  assert table['metric'] == 'roc_auc'
  assert set(table['eval']) == {'gbt', 'logreg'}
  aucs = {k: v['roc_auc'] for k, v in table['eval'].items()}
  assert table['chosen'] == max(aucs, key=aucs.get)
  assert metadata['model_type'] == table['chosen']
  assert metadata['metrics']['eval']['roc_auc'] == aucs[table['chosen']]
  # Both were evaluated on the same rows.
  rows = {json.dumps(inference.read_metadata(
      str(out / 'model_candidates' / k))['training']['rows'])
          for k in ('gbt', 'logreg')}
  assert len(rows) == 1
  # Still a verifiable model, registered with the comparison.
  inference.verify_model_dir(str(out / 'model'))
  entry = Registry(root).get(second['registry']['registered'])
  assert entry['model_type'] == table['chosen']
  assert entry['compared'] == table


def test_an_unknown_model_type_is_one_line(tmp_path, capsys):
  assert batch.main(['--output_dir', str(tmp_path), '--model_type',
                     'gbt,forest']) == 2
  assert "--model_type 'gbt,forest': give one or more of" in \
      capsys.readouterr().err
