"""The model registry: statuses, promotion, rollback, crash safety, and the
batch job training into it and scoring with its champion."""

import hashlib
import json
import os
import threading

import pytest

from pipelines import batch
from pipelines import generate
from pipelines import registry as registry_cmd
from pipelines.model import registry as registry_lib
from transforms import inference
from pipelines.model.registry import (CANDIDATE, CHAMPION, RETIRED, Registry,
                                RegistryError)


def _model(tmp_path, version, auc, importance=None):
  """A model folder as verify_model_dir checks it (files and digests)."""
  folder = tmp_path / f'model-{version}'
  folder.mkdir()
  data = f'estimator {version}'.encode()
  (folder / 'model.skops').write_bytes(data)
  (folder / 'metadata.json').write_text(json.dumps({
      'model_version': version, 'model_type': 'gbt', 'task': 'binary',
      'metrics': {'eval': {'roc_auc': auc}}, 'importance': importance,
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


def _pointers(root):
  folder = root / 'promotions'
  return {name: json.loads((folder / name).read_text())['version']
          for name in sorted(os.listdir(folder)) if name.endswith('.json')}


def test_a_crash_mid_promotion_leaves_the_old_index(tmp_path, monkeypatch):
  root = tmp_path / 'reg'
  r = Registry(str(root))
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  r.register(_model(tmp_path, 'v2', 0.95), 'second')
  before = (root / 'index.json').read_bytes()

  def crash(src, dst):
    raise OSError('power cut')
  monkeypatch.setattr(registry_lib.files.os, 'replace', crash)
  with pytest.raises(OSError):
    r.promote('v2', 'better')
  monkeypatch.undo()
  assert (root / 'index.json').read_bytes() == before
  assert Registry(str(root)).champion()['version'] == 'v1'
  # No pointer names v2: a follower of the pointers keeps the champion.
  assert _pointers(root) == {'000001.json': 'v1'}


def test_a_crash_after_the_index_leaves_no_wrong_pointer(tmp_path,
                                                         monkeypatch):
  root = tmp_path / 'reg'
  r = Registry(str(root))
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  r.register(_model(tmp_path, 'v2', 0.95), 'second')
  replace = os.replace
  calls = []

  def crash_on_the_second(src, dst):
    calls.append(dst)
    if len(calls) == 2:
      raise OSError('power cut')
    replace(src, dst)
  monkeypatch.setattr(registry_lib.files.os, 'replace', crash_on_the_second)
  with pytest.raises(OSError):
    r.promote('v2', 'better')
  monkeypatch.undo()
  # The index was written first: v2 is the champion, and no pointer names
  # a model that is not (the new one is missing, the old one was right
  # when written).
  assert calls[0].endswith('index.json')
  assert r.champion()['version'] == 'v2'
  assert _pointers(root) == {'000001.json': 'v1'}
  # The next write adds the missing pointer.
  r.register(_model(tmp_path, 'v3', 0.9), 'third')
  assert _pointers(root) == {'000001.json': 'v1', '000002.json': 'v2'}


def test_two_promotions_at_once_both_land(tmp_path, monkeypatch):
  root = str(tmp_path / 'reg')
  r = Registry(root)
  for version in ('v1', 'v2', 'v3'):
    r.register(_model(tmp_path, version, 0.9), version)
  # Each writer waits (at most a second) after reading the index and
  # before writing it: without a lock both read the same index and the
  # later write loses the other's promotion; with it the second writer
  # reads only once the first has written.
  meet = threading.Barrier(2, timeout=1)
  write = Registry._write

  def slow_write(self, index):
    try:
      meet.wait()
    except threading.BrokenBarrierError:
      pass
    write(self, index)
  monkeypatch.setattr(Registry, '_write', slow_write)
  errors = []

  def promote(version):
    try:
      Registry(root).promote(version, f'{version} at once')
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=promote, args=(v,)) for v in ('v2', 'v3')]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  entries = {e['version']: e for e in Registry(root).entries()}
  # Both promotions are in the index, one after the other.
  promoted = [v for v in ('v2', 'v3') if any(
      h['status'] == CHAMPION for h in entries[v]['history'])]
  assert promoted == ['v2', 'v3']
  assert sorted(e['status'] for e in entries.values()) == [
      CHAMPION, RETIRED, RETIRED]
  assert sorted(_pointers(tmp_path / 'reg').values()) == ['v1', 'v2', 'v3']


@pytest.mark.parametrize('change,message', [
    (lambda i: i['versions'][0].update(version=7), 'no version name'),
    (lambda i: i['versions'][1].pop('status'), "v2 has status None"),
    (lambda i: i['versions'][1].update(dir='../../elsewhere'),
     "v2 has dir '../../elsewhere'"),
    (lambda i: i['versions'][1].update(status=CHAMPION),
     'more than one champion'),
    (lambda i: i['versions'][0].update(history='none'), 'no history'),
    (lambda i: i.update(versions={'v1': {}}), 'no list of versions'),
    (lambda i: i['versions'].append(3), 'is not an object'),
])
def test_a_corrupted_index_is_one_line_and_exit_2(tmp_path, capsys, change,
                                                  message):
  root = tmp_path / 'reg'
  r = Registry(str(root))
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  r.register(_model(tmp_path, 'v2', 0.95), 'second')
  index = json.loads((root / 'index.json').read_text())
  change(index)
  (root / 'index.json').write_text(json.dumps(index))
  capsys.readouterr()
  for argv in (['list'], ['promote', 'v2'], ['rollback']):
    assert registry_cmd.main(argv + ['--registry', str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is not a registry index' in err[0], err
    assert message in err[0]


def test_entry_lists_the_most_important_features(tmp_path, capsys):
  features = [{'feature': f'f{i:02d}', 'columns': 1, 'mean': 0.5 - i / 100,
               'std': 0.0} for i in range(12)]
  root = str(tmp_path / 'reg')
  entry = Registry(root).register(_model(
      tmp_path, 'v1', 0.9, {'metric': 'roc_auc', 'features': features}),
      'first')
  # The ten most important, most important first, as in the metadata.
  assert entry['importance']['metric'] == 'roc_auc'
  assert list(entry['importance']['top']) == [f'f{i:02d}' for i in range(10)]
  assert entry['importance']['top']['f00'] == 0.5
  assert registry_cmd.main(['list', '--registry', root]) == 0
  assert capsys.readouterr().out.splitlines()[1].endswith(' f00')


def test_command_line(tmp_path, capsys):
  root = str(tmp_path / 'reg')
  r = Registry(root)
  r.register(_model(tmp_path, 'v1', 0.9), 'first')
  r.register(_model(tmp_path, 'v2', 0.95), 'second')
  assert registry_cmd.main(['list', '--registry', root]) == 0
  listing = capsys.readouterr().out
  assert 'v1' in listing and 'champion' in listing and 'roc_auc 0.9500' in \
      listing
  assert registry_cmd.main(['promote', 'v9', '--registry', root]) == 2
  assert 'holds no version v9' in capsys.readouterr().err
  assert registry_cmd.main(['promote', 'v2', '--registry', root,
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


def test_a_candidate_run_names_both_models(trained):
  """The second run trained a candidate and the champion scored: the
  summary (returned and on disk) and the report's Model section show the
  candidate with its own metrics, curves and status, and the champion as
  the model that scored, not trained in this run."""
  from pipelines.reporting import report
  tmp, root, _, (first, second) = trained
  out = tmp / 'out1'
  assert json.loads((out / 'run_summary.json').read_text())[
      'trained_model'] == second['trained_model']
  new, scored = second['trained_model'], second['model']
  candidate = Registry(root).get(second['registry']['registered'])
  assert new['version'] == candidate['version'] != scored['version']
  assert new['trained_in_this_run'] and new['registry_status'] == CANDIDATE
  assert new['dir'] == str(out / 'model')
  assert new['metrics']['eval']['roc_auc'] == pytest.approx(
      candidate['metrics']['roc_auc'])
  assert scored['version'] == first['model']['version']
  assert not scored['trained_in_this_run']
  assert scored['registry_status'] == CHAMPION
  assert scored['metrics'] == first['model']['metrics']
  # The first run's own model trained and scored: one model, both ways.
  assert first['trained_model']['version'] == first['model']['version']
  assert first['model']['trained_in_this_run']

  page = report.render(str(out))
  model = page[page.index('<section id="model"'):]
  model = model[:model.index('</section>')]
  trained_at = model.index(f'Trained in this run: <span class="mono">'
                           f'{new["version"]}</span> (candidate')
  scored_at = model.index(f'Scored this run\'s predictions: <span '
                          f'class="mono">{scored["version"]}</span> '
                          '(champion)')
  assert trained_at < scored_at
  assert f'{new["metrics"]["eval"]["roc_auc"]:.4f}' in model[:scored_at]
  assert f'{scored["metrics"]["eval"]["roc_auc"]:.4f}' in model[scored_at:]
  # The curves are the candidate's, on this run's eval split.
  curves = page[page.index('<section id="curves"'):]
  assert f'Model <span class="mono">{new["version"]}</span>' in curves[
      :curves.index('</section>')]
  assert f'AUC {new["metrics"]["eval"]["roc_auc"]:.3f}' in curves


def test_predictions_say_which_split_their_row_was_in(trained):
  """The first run's model trained and scored: its predictions' `split`
  rebuilds the eval set (as many rows as the model's eval split, with the
  ids the trainer held out). The second run scored with the champion,
  trained on other rows: every row is `scored`."""
  import pyarrow.parquet as pq
  from pipelines.model import training
  from schemas.dataset import load_dataset
  tmp, _, _, (first, _) = trained
  for out, summary in (('out0', first),):
    table = pq.read_table(str(next((tmp / out / 'predictions').glob(
        '*.parquet'))))
    metadata = inference.read_metadata(summary['model']['dir'])
    split = table.column('split').to_pylist()
    assert split.count('eval') == metadata['training']['rows']['eval']
    assert split.count('train') == metadata['training']['rows']['train']
    transformed = training.read_transformed(
        str(tmp / out / 'transform' / 'transformed'))
    _, held_out = training.split(transformed, load_dataset(), 0.2)
    ids = table.column('transaction_id').to_pylist()
    assert {i for i, s in zip(ids, split) if s == 'eval'} == set(
        held_out.column('transaction_id').to_pylist())
  second = pq.read_table(str(next((tmp / 'out1' / 'predictions').glob(
      '*.parquet'))))
  assert set(second.column('split').to_pylist()) == {'scored'}


def test_scoring_follows_a_promotion(trained):
  tmp, root, paths, (_, second) = trained
  new = second['registry']['registered']
  assert registry_cmd.main(['promote', new, '--registry', root]) == 0
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
  # Only the kept one has its permutation importance computed.
  assert metadata['importance']['metric'] == 'roc_auc'
  assert all(inference.read_metadata(str(out / 'model_candidates' / k))[
      'importance'] is None for k in ('gbt', 'logreg'))
  # Still a verifiable model, registered with the comparison.
  inference.verify_model_dir(str(out / 'model'))
  entry = Registry(root).get(second['registry']['registered'])
  assert entry['model_type'] == table['chosen']
  assert entry['compared'] == table


def test_an_unknown_model_type_is_one_line(tmp_path, capsys):
  assert batch.main(['--output_dir', str(tmp_path), '--model_type',
                     'gbt,forest']) == 2
  assert "--model_type 'gbt,forest': auto, or one or more of" in \
      capsys.readouterr().err
