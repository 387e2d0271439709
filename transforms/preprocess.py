"""tf.Transform preprocessing derived from the dataset's `transform:` section.

`make_preprocessing_fn(dataset)` turns the per-feature declarations into a
preprocessing_fn; `AnalyzeAndTransform` runs it over TFXIO RecordBatches,
writes the transform graph and returns flat transformed RecordBatches.

Per-feature treatment (output column `<name>_xf`, see `transformed_name`):
  * numeric z_score      -> float32 (x - mean) / std over the analysed data
  * numeric log_z_score  -> z-score of sign(x) * log1p(|x|). Amounts can be
    negative (refunds): the signed log keeps refunds apart from purchases and
    equals log1p(x) for x >= 0. (log1p(max(x, 0)) would fold every refund onto
    0, the same value as a zero amount.)
  * numeric none         -> float32 cast, unscaled
  * bucketize: n         -> int64 quantile bucket in [0, n)
  * categorical          -> int64 vocabulary index (most frequent first);
    unseen values go to one of `oov_buckets` indices after the vocabulary.

The id, the event time and the label are not inputs of the graph: they are
tf.Transform passthrough keys (`tft_beam.Context(passthrough_keys=...)`), so
they travel beside the transformed columns unchanged (the label stays null
where it is missing) and serving never needs them.
"""

import functools
import tempfile
from typing import Dict, List, Mapping, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions
import numpy as np
import pyarrow as pa
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.tfxio import tensor_adapter
from tfx_bsl.tfxio import tensor_representation_util

from transforms import arrow

SCALES = ('z_score', 'log_z_score', 'none')
_TF_TYPES = {'string': tf.string, 'float': tf.float32, 'int': tf.int64}


def transformed_name(name: str) -> str:
  """Output column of raw feature `name`."""
  return f'{name}_xf'


def transformed_feature_names(dataset) -> List[str]:
  """Transformed model inputs, in `dataset.model_features()` order."""
  return [transformed_name(n) for n in dataset.model_features()]


def categorical_feature_names(dataset) -> List[str]:
  """Transformed columns holding vocabulary indices (not ordinal)."""
  return [transformed_name(n)
          for n in dataset.transform.get('categorical', {})]


def raw_input_types(dataset) -> Dict[str, str]:
  """Raw model input -> field type ('string' | 'float' | 'int')."""
  types = dataset.feature_types()
  return {n: types[n] for n in dataset.model_features()}


def passthrough_keys(dataset) -> List[str]:
  """Columns carried beside the graph: id, event time, label (if any)."""
  keys = [dataset.id_field, dataset.timestamp_field]
  if dataset.label_field:
    keys.append(dataset.label_field)
  return keys


def input_types(dataset) -> Dict[str, str]:
  """Columns of the TFXIO batches fed to `AnalyzeAndTransform`."""
  types = dataset.feature_types()
  out = raw_input_types(dataset)
  out.update({k: types[k] for k in passthrough_keys(dataset)})
  return out


def raw_feature_spec(dataset) -> Dict[str, tf.io.FixedLenFeature]:
  """Feature spec of the graph's inputs: the model features only."""
  return {n: tf.io.FixedLenFeature([], _TF_TYPES[t])
          for n, t in raw_input_types(dataset).items()}


def tensor_adapter_config(dataset) -> tensor_adapter.TensorAdapterConfig:
  """TFXIO config: Arrow schema of all input columns, tensors for features.

  Passthrough columns are in the Arrow schema but have no tensor
  representation, as tf.Transform requires.
  """
  schema = schema_utils.schema_from_feature_spec(raw_feature_spec(dataset))
  representations = (
      tensor_representation_util.InferTensorRepresentationsFromSchema(schema))
  return tensor_adapter.TensorAdapterConfig(
      arrow.tfxio_arrow_schema(input_types(dataset)), representations)


def transformed_arrow_schema(dataset) -> pa.Schema:
  """Flat schema of the transformed batches (and Parquet `transformed/`)."""
  t = dataset.transform
  fields = [pa.field(transformed_name(n), pa.float32())
            for n in t.get('numeric', {})]
  fields += [pa.field(transformed_name(n), pa.int64())
             for n in list(t.get('bucketize', {})) +
             list(t.get('categorical', {}))]
  fields += [pa.field(dataset.id_field, pa.string()),
             pa.field(dataset.timestamp_field, pa.int64())]
  if dataset.label_field:
    fields.append(pa.field(dataset.label_field, pa.int64()))
  return pa.schema(fields)


def _signed_log1p(x):
  return tf.sign(x) * tf.math.log1p(tf.abs(x))


def preprocessing_fn(inputs: Mapping[str, tf.Tensor], *,
                     numeric: Mapping[str, str],
                     bucketize: Mapping[str, int],
                     categorical: Mapping[str, Mapping[str, int]]
                     ) -> Dict[str, tf.Tensor]:
  """Raw feature tensors -> transformed tensors; settings keyed by feature."""
  out = {}
  for name, scale in numeric.items():
    x = tf.cast(inputs[name], tf.float32)
    if scale == 'log_z_score':
      x = _signed_log1p(x)
    if scale in ('z_score', 'log_z_score'):
      x = tft.scale_to_z_score(x, name=f'z_{name}')
    out[transformed_name(name)] = x
  for name, num_buckets in bucketize.items():
    x = tf.cast(inputs[name], tf.float32)
    out[transformed_name(name)] = tft.bucketize(
        x, num_buckets=int(num_buckets), name=f'bucketize_{name}')
  for name, opts in categorical.items():
    out[transformed_name(name)] = tft.compute_and_apply_vocabulary(
        inputs[name], num_oov_buckets=int((opts or {}).get('oov_buckets', 0)),
        vocab_filename=name, name=f'vocab_{name}')
  return out


def make_preprocessing_fn(dataset):
  """The dataset's preprocessing_fn: `preprocessing_fn` bound to its settings.

  A functools.partial of a top-level function, so it pickles.
  """
  t = dataset.transform
  numeric = dict(t.get('numeric', {}))
  for name, scale in numeric.items():
    if scale not in SCALES:
      raise ValueError(f'transform.numeric.{name}: unknown scale {scale!r}; '
                       f'use one of {", ".join(SCALES)}')
  return functools.partial(
      preprocessing_fn, numeric=numeric,
      bucketize={k: int(v) for k, v in t.get('bucketize', {}).items()},
      categorical={k: dict(v or {}) for k, v in
                   t.get('categorical', {}).items()})


def flatten_transformed(transformed, schema: pa.Schema) -> pa.RecordBatch:
  """tf.Transform's `output_record_batches=True` element -> flat columns.

  `transformed` is (RecordBatch of list columns, unary passthrough dict of
  one-row arrays); every list holds one value (or none, e.g. a missing
  label, which becomes null). Returns a RecordBatch of `schema`'s columns,
  cast to its types (passthrough ids: UTF-8 bytes -> strings); a unary
  passthrough value is repeated on every row.
  """
  batch, unary = transformed
  names = set(batch.schema.names)
  broadcast = None
  columns = []
  for field in schema:
    if field.name in names:
      column = arrow.first_values(batch.column(field.name))
    elif field.name in unary:
      if broadcast is None:
        broadcast = pa.array(np.zeros(batch.num_rows, dtype=np.int64))
      column = arrow.first_values(unary[field.name]).take(broadcast)
    else:
      raise ValueError(f'tf.Transform output has no column {field.name}')
    if column.type != field.type:
      column = column.cast(field.type)
    columns.append(column)
  return pa.RecordBatch.from_arrays(columns, schema=schema)


class AnalyzeAndTransform(beam.PTransform):
  """PCollection[pa.RecordBatch] TFXIO -> PCollection[pa.RecordBatch] flat.

  Input: TFXIO RecordBatches with the columns of `input_types(dataset)`
  (e.g. from `transforms.arrow.ToTFXIOBatches(input_types(dataset))`).
  Analyses the whole input, writes the transform graph to `transform_dir`
  (tft layout: transform_fn/ and transformed_metadata/) and returns
  RecordBatches of `transformed_arrow_schema(dataset)`, one row per input
  row: `<feature>_xf` values plus the id (string), event time (int64 epoch
  us) and label (int64, null where missing), passed through unchanged.

  Opens its own `tft_beam.Context(temp_dir=...)` with the passthrough keys
  set. temp_dir defaults to the pipeline's --temp_location, else a local
  temporary directory; never inside transform_dir, which then holds only
  the graph.
  """

  def __init__(self, dataset, transform_dir: str,
               temp_dir: Optional[str] = None):
    super().__init__()
    self._dataset = dataset
    self._transform_dir = transform_dir
    self._temp_dir = temp_dir

  def expand(self, batches):
    dataset = self._dataset
    temp_dir = (self._temp_dir or
                batches.pipeline.options.view_as(
                    GoogleCloudOptions).temp_location or
                tempfile.mkdtemp(prefix='tft_'))
    with tft_beam.Context(temp_dir=temp_dir,
                          passthrough_keys=set(passthrough_keys(dataset))):
      (transformed, _), transform_fn = (
          (batches, tensor_adapter_config(dataset))
          | 'AnalyzeAndTransformDataset' >> tft_beam.AnalyzeAndTransformDataset(
              make_preprocessing_fn(dataset), output_record_batches=True))
      _ = transform_fn | 'WriteTransformFn' >> tft_beam.WriteTransformFn(
          self._transform_dir)
    return transformed | 'FlattenColumns' >> beam.Map(
        flatten_transformed, transformed_arrow_schema(dataset))
