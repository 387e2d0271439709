"""Scoring feature rows with a trained model directory via Beam RunInference.

A model directory (written by pipelines.train) holds:
  model.joblib     the fitted scikit-learn estimator
  transform_fn/    the tf.Transform output dir (transform_fn/,
                   transformed_metadata/) the model was trained on
  metadata.json    version, raw input types, feature order, threshold,
                   metrics and `files: {relative path: sha256}`

`TransformedSklearnModelHandler` verifies every file against metadata.json,
applies the transform graph to raw feature rows and scores them;
`feature_matrix` is the one place where columns become the model's input
matrix, for training and serving alike. `ScoreRecords` can swap models in a
running pipeline from a side input of ModelMetadata (model refresh).
"""

import dataclasses
import hashlib
import io
import json
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RunInference
import numpy as np
import threadpoolctl

METADATA_FILE = 'metadata.json'
MODEL_FILE = 'model.joblib'
TRANSFORM_DIR = 'transform_fn'


class ModelIntegrityError(RuntimeError):
  """A model directory file is missing, unexpected or has the wrong sha256."""


# Model directory files ------------------------------------------------------
def join_path(root: str, relative: str) -> str:
  """root + a "/"-separated relative path, for any Beam filesystem."""
  return FileSystems.join(root, *relative.split('/'))


def list_files(root: str) -> Dict[str, str]:
  """Relative path ('/'-separated) -> full path of every file under root."""
  root = root.rstrip('/')
  matches = FileSystems.match([f'{root}/**'])[0].metadata_list
  out = {}
  for m in matches:
    if m.path.endswith('/'):  # object-store "directory" markers
      continue
    relative = m.path[len(root):].lstrip('/\\').replace('\\', '/')
    out[relative] = m.path
  return dict(sorted(out.items()))


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with FileSystems.open(path) as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def file_digests(model_dir: str) -> Dict[str, str]:
  """sha256 of every file in model_dir except metadata.json."""
  return {rel: sha256_of(path) for rel, path in list_files(model_dir).items()
          if rel != METADATA_FILE}


def content_version(digests: Mapping[str, str]) -> str:
  """Deterministic version from file digests: 'v' + 16 hex of their sha256."""
  text = ''.join(f'{rel}\0{sha}\n' for rel, sha in sorted(digests.items()))
  return 'v' + hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def model_dir_of(model_path: str) -> str:
  """A model directory or the path of its metadata.json -> the directory.

  Model watchers (WatchFilePattern on <dir>/metadata.json) name the file;
  everything else names the directory.
  """
  path = model_path.rstrip('/\\')
  head, tail = FileSystems.split(path)
  return head if tail == METADATA_FILE else path


def read_metadata(model_dir: str) -> Dict[str, Any]:
  with FileSystems.open(join_path(model_dir, METADATA_FILE)) as f:
    return json.loads(f.read().decode('utf-8'))


def verify_model_dir(model_dir: str) -> Dict[str, Any]:
  """Checks every file's sha256 against metadata.json; returns the metadata.

  Raises ModelIntegrityError naming the first file that is missing, not
  listed, or whose content changed.
  """
  try:
    metadata = read_metadata(model_dir)
  except (OSError, ValueError) as e:
    raise ModelIntegrityError(
        f'{model_dir}: cannot read {METADATA_FILE}: {e}') from None
  expected = metadata.get('files')
  if not expected:
    raise ModelIntegrityError(f'{model_dir}: {METADATA_FILE} lists no files')
  found = {rel: path for rel, path in list_files(model_dir).items()
           if rel != METADATA_FILE}
  missing = sorted(set(expected) - set(found))
  if missing:
    raise ModelIntegrityError(f'{model_dir}: {missing[0]} is missing')
  unlisted = sorted(set(found) - set(expected))
  if unlisted:
    raise ModelIntegrityError(
        f'{model_dir}: {unlisted[0]} is not listed in {METADATA_FILE}')
  for rel in sorted(expected):
    actual = sha256_of(found[rel])
    if actual != expected[rel]:
      raise ModelIntegrityError(
          f'{model_dir}: {rel} has sha256 {actual}, expected {expected[rel]}')
  return metadata


# Features -------------------------------------------------------------------
def feature_matrix(columns: Mapping[str, Any],
                   feature_names: Sequence[str]) -> np.ndarray:
  """Transformed columns -> float64 matrix [rows, features] in given order.

  `columns` maps a transformed feature name to a 1-D sequence (numpy array,
  tf tensor, list, pyarrow array). Used by training and serving alike, so
  the column order and dtype are decided once.
  """
  missing = [n for n in feature_names if n not in columns]
  if missing:
    raise KeyError(f'feature columns missing: {", ".join(missing)}')
  arrays = []
  for name in feature_names:
    column = columns[name]
    if hasattr(column, 'to_numpy') and not isinstance(column, np.ndarray):
      # pyarrow: zero_copy_only=False to allow chunked/nullable columns.
      try:
        column = column.to_numpy(zero_copy_only=False)
      except TypeError:
        column = column.to_numpy()
    elif hasattr(column, 'numpy'):
      column = column.numpy()
    values = np.asarray(column, dtype=np.float64).reshape(-1)
    arrays.append(values)
  if not arrays:
    return np.zeros((0, 0), dtype=np.float64)
  lengths = {len(a) for a in arrays}
  if len(lengths) != 1:
    raise ValueError(f'feature columns have different lengths: {lengths}')
  return np.stack(arrays, axis=1)


def raw_feature_tensors(rows: Sequence[Mapping[str, Any]],
                        raw_types: Mapping[str, str]) -> Dict[str, Any]:
  """One batch of raw rows -> {feature: tf tensor [batch]} for the graph."""
  import tensorflow as tf
  numpy_types = {'float': np.float32, 'int': np.int64}
  out = {}
  for name, ftype in raw_types.items():
    values = [row.get(name) for row in rows]
    if any(v is None for v in values):
      raise ValueError(f'feature {name} is missing in a row to score')
    if ftype == 'string':
      out[name] = tf.constant(
          [v.encode('utf-8') if isinstance(v, str) else v for v in values],
          dtype=tf.string)
    else:
      out[name] = tf.constant(np.asarray(values, dtype=numpy_types[ftype]))
  return out


# Model handler --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadedModel:
  # A class, not a NamedTuple: RunInference's Shared cache holds a weakref.
  estimator: Any
  transform_layer: Any
  metadata: Dict[str, Any]


class TransformedSklearnModelHandler(ModelHandler[Mapping[str, Any],
                                                  PredictionResult,
                                                  LoadedModel]):
  """Raw feature rows (dicts) -> PredictionResult via tf.Transform + sklearn.

  PredictionResult.inference is {'score': P(label=1), 'predicted_label':
  score >= threshold}; model_id is the model version from metadata.json.
  Wrap it in KeyedModelHandler to carry an id with each row.
  """

  def __init__(self, model_dir: str, *, min_batch_size: int = 1,
               max_batch_size: int = 1024, **kwargs):
    super().__init__(min_batch_size=min_batch_size,
                     max_batch_size=max_batch_size, **kwargs)
    self._model_dir = model_dir

  def load_model(self) -> LoadedModel:
    import joblib
    import tensorflow_transform as tft
    metadata = verify_model_dir(self._model_dir)
    transform_dir = metadata.get('transform_dir', TRANSFORM_DIR)
    model_file = metadata.get('model_file', MODEL_FILE)
    layer = tft.TFTransformOutput(
        join_path(self._model_dir, transform_dir)).transform_features_layer()
    with FileSystems.open(join_path(self._model_dir, model_file)) as f:
      estimator = joblib.load(io.BytesIO(f.read()))
    return LoadedModel(estimator, layer, metadata)

  def run_inference(self, batch: Sequence[Mapping[str, Any]],
                    model: LoadedModel,
                    inference_args: Optional[Dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    if not batch:
      return []
    metadata = model.metadata
    transformed = model.transform_layer(
        raw_feature_tensors(batch, metadata['raw_features']))
    x = feature_matrix(transformed, metadata['features'])
    # One OpenMP thread: Beam already runs bundles in parallel, and
    # scikit-learn's per-call thread pool start-up cost more than the
    # prediction itself on small batches (bench/RESULTS.md).
    with threadpoolctl.threadpool_limits(limits=1):
      scores = model.estimator.predict_proba(x)[:, 1]
    threshold = float(metadata['threshold'])
    version = metadata['model_version']
    return [PredictionResult(row, {'score': float(s),
                                   'predicted_label': int(s >= threshold)},
                             version)
            for row, s in zip(batch, scores)]

  def update_model_path(self, model_path: Optional[str] = None):
    """Points the next load_model at a model dir or its metadata.json.

    RunInference calls this with each new side-input ModelMetadata.model_id;
    '' or None (WatchFilePattern's "nothing newer than the start") keeps the
    current model.
    """
    if model_path:
      self._model_dir = model_dir_of(model_path)

  def get_metrics_namespace(self) -> str:
    return 'TransformedSklearnModelHandler'


def _to_prediction(keyed, id_field):
  key, result = keyed
  return {id_field: key, 'score': result.inference['score'],
          'predicted_label': result.inference['predicted_label'],
          'model_version': result.model_id}


class ScoreRecords(beam.PTransform):
  """PCollection[dict] feature rows -> PCollection[dict] predictions.

  Output: {<id_field>: id, 'score': float, 'predicted_label': int,
  'model_version': str}, one per input row; model_version is that of the
  model that scored the row. The id field defaults to the one recorded in
  model_dir's metadata.json (read at construction, kept across refreshes).

  model_metadata_pcoll: optional PCollection[ModelMetadata] side input
  (e.g. WatchFilePattern on 'gs://b/models/*/metadata.json'). RunInference
  reads it as a singleton per window of the rows; a model_id naming a
  model dir or its metadata.json, different from the last one seen, loads
  and verifies that model for the following batches. While the side input
  is empty or its model_id is '' (WatchFilePattern's value when no file is
  newer than the pipeline), model_dir scores. A model dir that fails
  verification fails the bundle (a streaming runner retries it), so publish
  metadata.json last, as pipelines.train does.
  """

  def __init__(self, model_dir: str, *, id_field: Optional[str] = None,
               min_batch_size: int = 1, max_batch_size: int = 1024,
               model_metadata_pcoll: Optional[beam.PCollection] = None):
    super().__init__()
    self._model_dir = model_dir
    self._id_field = id_field or read_metadata(model_dir)['id_field']
    self._batch = dict(min_batch_size=min_batch_size,
                       max_batch_size=max_batch_size)
    self._model_metadata_pcoll = model_metadata_pcoll

  def expand(self, rows):
    id_field = self._id_field
    handler = KeyedModelHandler(
        TransformedSklearnModelHandler(self._model_dir, **self._batch))
    return (rows
            | 'KeyById' >> beam.Map(lambda row: (row[id_field], row))
            | 'RunInference' >> RunInference(
                handler, model_metadata_pcoll=self._model_metadata_pcoll)
            | 'ToPrediction' >> beam.Map(_to_prediction, id_field))
