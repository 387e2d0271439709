"""Model refresh without restart: RunInference's model side input.

Two model directories trained on one tf.Transform output (module fixture):
A and B are both logistic regressions but fit on different splits, so they
have different versions and different scores for the same row.

Why the streaming test windows the side input: Beam 2.72's Python
DirectRunner (the one that runs TestStream) holds a main-input window until
the side input's watermark passes that window's end. A global-window side
input (WatchFilePattern's shape) is therefore read only once it is complete,
holding every model ever emitted: see
test_global_window_side_input_cannot_switch_on_the_direct_runner. Per fixed
window, the side input is read as each window closes, so the switch is
deterministic, and it goes through the same RunInference code path
(_RunInferenceDoFn.process -> update_model_path -> load_model).
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import

import json
import os
import time

import apache_beam as beam
from apache_beam.ml.inference.base import ModelMetadata
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window
from apache_beam.transforms.window import TimestampedValue
import pytest

from pipelines import streaming
from pipelines.model import training as train_lib
from schemas.dataset import load_dataset
from tests.test_train_inference import synthetic_rows, to_batch, to_batches
from transforms import arrow, inference, preprocess
from transforms.sinks import WriteParquet
from transforms.read import InputError

DATASET = load_dataset()
WINDOW = 60  # seconds of event time per side-input window
ROWS_PER_WINDOW = 4


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """Trains model dirs A and B; returns their dirs, serving rows and the
  score each model gives each row (computed outside any pipeline)."""
  root = tmp_path_factory.mktemp('refresh')
  rows = synthetic_rows(n=400, is_fraud_rate=0.2, seed=3)
  transform_dir = str(root / 'transform')
  # FnApiRunner: the default DirectRunner first looks for Prism (slower).
  with beam.Pipeline('FnApiRunner') as p:
    _ = (p
         | beam.Create(to_batches(rows, 100))
         | arrow.ToTFXIOBatches(preprocess.input_types(DATASET))
         | preprocess.AnalyzeAndTransform(DATASET, transform_dir,
                                          temp_dir=str(root / 'tmp'))
         | WriteParquet(str(root / 'transformed' / 'part'),
                        preprocess.transformed_arrow_schema(DATASET)))
  table = train_lib.read_transformed(str(root / 'transformed'))
  dirs = {}
  for name, eval_fraction in (('a', 0.2), ('b', 0.5)):
    dirs[name] = str(root / 'models' / name)
    train_lib.train(table, transform_dir=transform_dir, model_dir=dirs[name],
                    dataset=DATASET, model='logreg',
                    eval_fraction=eval_fraction,
                    model_version=f'model-{name}')
  serving = [dict(r, is_fraud=None) for r in rows[:3 * ROWS_PER_WINDOW]]
  scores = {}
  for name, model_dir in dirs.items():
    handler = inference.TransformedSklearnModelHandler(model_dir)
    [result] = handler.run_inference([to_batch(serving)],
                                     handler.load_model())
    scores[name] = {p['transaction_id']: p['score']
                    for p in result.inference.to_pylist()}
  diff = max(abs(scores['a'][k] - scores['b'][k]) for k in scores['a'])
  assert diff > 1e-4, 'A and B must score differently for the test to bite'
  return {'dirs': dirs, 'rows': serving, 'scores': scores}


def _metadata_json(model_dir):
  return os.path.join(model_dir, inference.METADATA_FILE)


def _streaming():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


# Handler --------------------------------------------------------------------
def test_update_model_path_accepts_metadata_json_and_keeps_model_on_empty(
    models):
  a, b = models['dirs']['a'], models['dirs']['b']
  handler = inference.TransformedSklearnModelHandler(a)
  assert handler.load_model().metadata['model_version'] == 'model-a'
  handler.update_model_path(_metadata_json(b))
  model = handler.load_model()
  assert model.metadata['model_version'] == 'model-b'
  row = models['rows'][0]
  [result] = handler.run_inference([to_batch([row])], model)
  assert result.model_id == 'model-b'
  [prediction] = result.inference.to_pylist()
  assert prediction['model_version'] == 'model-b'
  # Scored alone, the row gets the score it got in the fixture's batch (the
  # transformed values are the same bits; the logistic regression's float64
  # dot product may round differently by batch shape).
  assert prediction['score'] == pytest.approx(
      models['scores']['b'][row['transaction_id']], rel=1e-12)
  # '' and None (WatchFilePattern: nothing newer than the start) keep B.
  handler.update_model_path('')
  handler.update_model_path(None)
  assert handler.load_model().metadata['model_version'] == 'model-b'
  # A directory, with or without a trailing slash, still works.
  handler.update_model_path(a + '/')
  assert handler.load_model().metadata['model_version'] == 'model-a'


def test_model_dir_of():
  assert inference.model_dir_of('gs://b/models/v2/metadata.json') == (
      'gs://b/models/v2')
  assert inference.model_dir_of('gs://b/models/v2/') == 'gs://b/models/v2'
  assert inference.model_dir_of('/m/v2/metadata.json.tmp') == (
      '/m/v2/metadata.json.tmp')


# RunInference with a model side input ---------------------------------------
def test_streaming_side_input_switches_model_mid_stream(models):
  """Window 0: side input '' (keep --model_dir, A); window 1: B's
  metadata.json; window 2: A's again. Each row's prediction must carry the
  version and the score of the model in force for its window."""
  rows = models['rows']
  windows = [rows[i:i + ROWS_PER_WINDOW]
             for i in range(0, len(rows), ROWS_PER_WINDOW)]
  dirs = models['dirs']
  side = [ModelMetadata(model_id='', model_name=''),
          ModelMetadata(model_id=_metadata_json(dirs['b']), model_name='b'),
          ModelMetadata(model_id=_metadata_json(dirs['a']), model_name='a')]
  expected_model = ['a', 'b', 'a']

  stream = TestStream()
  for k, (meta, chunk) in enumerate(zip(side, windows)):
    start = k * WINDOW
    stream.add_elements([TimestampedValue(meta, start)], tag='models')
    stream.add_elements([TimestampedValue(r, start + 5) for r in chunk],
                        tag='rows')
    for tag in ('models', 'rows'):
      stream.advance_watermark_to(start + WINDOW, tag=tag)
  for tag in ('models', 'rows'):
    stream.advance_watermark_to_infinity(tag=tag)

  with _streaming() as p:
    events = p | stream
    model_side = events['models'] | 'ModelWindows' >> beam.WindowInto(
        window.FixedWindows(WINDOW))
    predictions = (events['rows']
                   | 'RowWindows' >> beam.WindowInto(
                       window.FixedWindows(WINDOW))
                   | inference.ScoreRecords(
                       dirs['a'], max_batch_size=3,
                       model_metadata_pcoll=model_side))
    expected = {r['transaction_id']: name
                for name, chunk in zip(expected_model, windows)
                for r in chunk}
    scores = models['scores']

    def check(got):
      assert sorted((p['transaction_id'], p['model_version']) for p in got) \
          == sorted((i, f'model-{name}') for i, name in expected.items())
      for p in got:
        # Batches differ from the fixture's: transformed values do not
        # depend on them, float64 dot products only in the last bits.
        name = expected[p['transaction_id']]
        assert p['score'] == pytest.approx(
            scores[name][p['transaction_id']], rel=1e-12), p

    assert_that(predictions, check)


def test_global_window_side_input_cannot_switch_on_the_direct_runner(models):
  """Pins the DirectRunner limitation the docstrings describe: with
  WatchFilePattern's shape (global window, processing-time trigger) the
  main input waits for the whole side input and then sees both models (as
  RunInference's singleton read it failed: "more than one element accessed
  as a singleton view"; Flink read it the same way, which is why scoring
  takes the newest of the list). Every row, even those sent before B was
  announced, is therefore scored by B. If a Beam upgrade makes the first
  rows A's, test the global-window form instead."""
  dirs = models['dirs']
  rows = models['rows']
  stream = (TestStream()
            .add_elements([TimestampedValue(ModelMetadata('', ''), 0)],
                          tag='models')
            .add_elements([TimestampedValue(r, 5) for r in rows[:2]],
                          tag='rows')
            .advance_processing_time(5)
            .add_elements([TimestampedValue(ModelMetadata(
                _metadata_json(dirs['b']), 'b'), 10)], tag='models')
            .advance_processing_time(5)
            .add_elements([TimestampedValue(r, 15) for r in rows[2:4]],
                          tag='rows')
            .advance_watermark_to_infinity(tag='models')
            .advance_watermark_to_infinity(tag='rows'))
  with _streaming() as p:
    events = p | stream
    model_side = events['models'] | beam.WindowInto(
        window.GlobalWindows(),
        trigger=trigger.Repeatedly(trigger.AfterProcessingTime(1)),
        accumulation_mode=trigger.AccumulationMode.DISCARDING)
    predictions = events['rows'] | inference.ScoreRecords(
        dirs['a'], model_metadata_pcoll=model_side)
    assert_that(predictions | beam.Map(
        lambda p: (p['transaction_id'], p['model_version'])),
                equal_to([(r['transaction_id'], 'model-b')
                          for r in rows[:4]]))


# Streaming pipeline flags ---------------------------------------------------
def _options(*args):
  options = PipelineOptions(list(args))
  options.view_as(StandardOptions).streaming = True
  return options


def test_watch_flags_wire_the_pattern_into_scoring(models):
  pattern = os.path.join(os.path.dirname(models['dirs']['a']), '*',
                         inference.METADATA_FILE)
  options = _options('--input_subscription',
                     'projects/my-project/subscriptions/tx',
                     '--model_dir', models['dirs']['a'],
                     '--model_watch_pattern', pattern,
                     '--model_watch_interval', '5')
  p = beam.Pipeline(options=options)
  built = streaming.build_pipeline(p, options, DATASET)
  assert built['predictions'] is not None
  [score] = [t for t in p.transforms_stack[0].parts
             if t.full_label == 'Score']
  assert (score.transform.model_watch_pattern,
          score.transform.model_watch_interval) == (pattern, 5.0)
  assert [t.full_label for t in score.parts[1:]] == [
      'Score/ScoreWithLatestModel', 'Score/Predictions']


def test_watching_scoring_step_follows_a_new_model_file(models, tmp_path):
  """ScoreWithLatestModel with a watch pattern, driven directly (no side
  input): A scores, files already there are ignored; once B's pointer
  appears, the next look loads B."""
  dirs = models['dirs']
  promotions = tmp_path / 'promotions'
  promotions.mkdir()
  (promotions / '000001.json').write_text(json.dumps({'dir': dirs['b']}))
  handler = inference.TransformedSklearnModelHandler(dirs['a'])
  fn = inference.ScoreWithLatestModel(
      handler, dirs['a'], watch_pattern=str(promotions / '*.json'),
      watch_interval=0.0, watch_after=time.time() + 1)
  fn.setup()
  batch = to_batch(models['rows'][:3])

  def versions():
    return {v for r in fn.process(batch)
            for v in r.inference.column('model_version').to_pylist()}
  assert versions() == {'model-a'}  # 000001 is older than the pipeline
  pointer = promotions / '000002.json'
  pointer.write_text(json.dumps({'dir': dirs['b']}))
  later = time.time() + 5
  os.utime(pointer, (later, later))
  assert versions() == {'model-b'}


def test_watch_flags_are_checked_before_the_run(models, tmp_path, capsys):
  def check(*args):
    options = _options(*args)
    streaming.check_model_watch(streaming.flags(options, streaming.StreamingOptions),
                                options)

  pattern = str(tmp_path / '*' / 'metadata.json')
  a = models['dirs']['a']
  check('--model_dir', a)  # no watch: nothing to check
  check('--model_dir', a, '--model_watch_pattern', pattern,
        '--runner', 'DataflowRunner')
  with pytest.raises(InputError, match='needs --model_dir'):
    check('--model_watch_pattern', pattern, '--runner', 'DataflowRunner')
  with pytest.raises(InputError, match='must be positive'):
    check('--model_dir', a, '--model_watch_pattern', pattern,
          '--model_watch_interval', '0', '--runner', 'DataflowRunner')
  for runner in ([], ['--runner', 'DirectRunner'],
                 ['--runner', 'BundleBasedDirectRunner']):
    with pytest.raises(InputError, match='DirectRunner'):
      check('--model_dir', a, '--model_watch_pattern', pattern, *runner)
  assert streaming.main(['--model_dir', a, '--model_watch_pattern', pattern,
                         '--output_dir', str(tmp_path / 'out')]) == 2
  assert 'needs a runner with streaming side inputs' in (
      capsys.readouterr().err)


def test_replay_entry_point_scores_every_valid_event(models, tmp_path):
  from pipelines import streaming
  from pipelines.synthetic import transactions as generate
  events = generate.generate_transactions(rows=300, users=10, seed=11,
                                          days=2)
  broken = generate.broken_records(events, seed=11, fmt='jsonl')
  path = tmp_path / 'events.jsonl'
  generate.write_records(generate.insert_broken(events, broken), str(path))
  summary = streaming.run(['--input', str(path), '--model_dir',
                           models['dirs']['a'], '--output_dir',
                           str(tmp_path / 'out')])
  assert summary['records_valid'] == 300
  assert summary['records_dead_lettered'] == len(broken)
  predictions = [json.loads(line) for f in
                 sorted((tmp_path / 'out' / 'streaming' /
                         'predictions').glob('*.jsonl'))
                 for line in open(f)]
  assert summary['predictions_written'] == len(predictions) == 300
  assert ({p['transaction_id'] for p in predictions} ==
          {e['transaction_id'] for e in events})
  assert {p['model_version'] for p in predictions} == {'model-a'}
