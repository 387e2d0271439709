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
  * an optional input (it may be missing) is fed as a sparse tensor and
    filled with its declared `impute` (mean of the analysed values, zero or
    a number) before the above; `indicator: true` adds `<name>_missing_xf`
    (1 where it was missing). A missing category is the value '' (or -1).

The label enters as what the model learns (`with_label_index`: a class
index, or a number for regression).

The id, the event time and the label are not inputs of the graph: they are
tf.Transform passthrough keys (`tft_beam.Context(passthrough_keys=...)`), so
they travel beside the transformed columns unchanged (the label stays null
where it is missing) and serving never needs them.
"""

import functools
import tempfile
from typing import Any, Dict, List, Mapping, Optional

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

from schemas.dataset import MISSING_SUFFIX, TRANSFORMED_SUFFIX
from transforms import arrow

_TF_TYPES = {'string': tf.string, 'float': tf.float32, 'int': tf.int64}


def transformed_name(name: str) -> str:
  """Output column of raw feature `name`."""
  return f'{name}{TRANSFORMED_SUFFIX}'


def indicator_name(name: str) -> str:
  """Output column saying where raw feature `name` was missing (1)."""
  return transformed_name(name + MISSING_SUFFIX)


def _indicators(dataset) -> List[str]:
  t = dataset.transform
  return [n for section in ('numeric', 'bucketize')
          for n, opts in t.get(section, {}).items() if opts['indicator']]


def transformed_feature_names(dataset) -> List[str]:
  """Transformed model inputs: `dataset.model_features()` order, then the
  missing-value indicators."""
  return ([transformed_name(n) for n in dataset.model_features()] +
          [indicator_name(n) for n in _indicators(dataset)])


def categorical_feature_names(dataset) -> List[str]:
  """Transformed columns holding vocabulary indices (not ordinal)."""
  return [transformed_name(n)
          for n in dataset.transform.get('categorical', {})]


def raw_input_types(dataset) -> Dict[str, str]:
  """Raw model input -> field type ('string' | 'float' | 'int')."""
  types = dataset.feature_types()
  return {n: types[n] for n in dataset.model_features()}


def optional_inputs(dataset) -> List[str]:
  """Raw model inputs that may be missing (fed as sparse tensors)."""
  optional = set(dataset.optional_columns())
  return [n for n in dataset.model_features() if n in optional]


def passthrough_keys(dataset) -> List[str]:
  """Columns carried beside the graph: id, event time and label (those
  the dataset has)."""
  keys = [dataset.id_field]
  if dataset.timestamp_field:
    keys.append(dataset.timestamp_field)
  if dataset.label_field:
    keys.append(dataset.label_field)
  return keys


def label_type(dataset) -> str:
  """What the model learns: a class index ('int') or a number ('float')."""
  return 'float' if dataset.task == 'regression' else 'int'


def input_types(dataset) -> Dict[str, str]:
  """Columns of the TFXIO batches fed to `AnalyzeAndTransform`."""
  types = dataset.feature_types()
  out = raw_input_types(dataset)
  out.update({k: types[k] for k in passthrough_keys(dataset)})
  if dataset.label_field:
    out[dataset.label_field] = label_type(dataset)
  return out


def with_label_index(batch: pa.RecordBatch, dataset) -> pa.RecordBatch:
  """Feature rows -> the same rows with the label as the model learns it
  (`Dataset.label_index`: class index or number), column-wise."""
  label = dataset.label_field
  if not label or label not in batch.schema.names:
    return batch
  i = batch.schema.get_field_index(label)
  columns = list(batch.columns)
  columns[i] = dataset.label_index(columns[i])
  return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def raw_feature_spec(dataset) -> Dict[str, Any]:
  """Feature spec of the graph's inputs: the model features only; an
  optional one is a VarLenFeature (a missing value is an empty list)."""
  optional = set(optional_inputs(dataset))
  return {n: (tf.io.VarLenFeature(_TF_TYPES[t]) if n in optional else
              tf.io.FixedLenFeature([], _TF_TYPES[t]))
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
  id_types = {'string': pa.string(), 'int': pa.int64()}
  fields = [pa.field(transformed_name(n), pa.float32())
            for n in t.get('numeric', {})]
  fields += [pa.field(transformed_name(n), pa.int64())
             for n in list(t.get('bucketize', {})) +
             list(t.get('categorical', {}))]
  fields += [pa.field(indicator_name(n), pa.int64())
             for n in _indicators(dataset)]
  fields.append(pa.field(dataset.id_field,
                         id_types[dataset.fields[dataset.id_field].type]))
  if dataset.timestamp_field:
    fields.append(pa.field(dataset.timestamp_field, pa.int64()))
  if dataset.label_field:
    fields.append(pa.field(dataset.label_field,
                           pa.float64() if dataset.task == 'regression'
                           else pa.int64()))
  return pa.schema(fields)


def _signed_log1p(x):
  return tf.sign(x) * tf.math.log1p(tf.abs(x))


def _dense(x, impute: Optional[Any], name: str):
  """(dense tensor, missing indicator or None): a sparse (optional) input
  filled with its declared imputation, the mean of the analysed values,
  zero or a number; a dense input as it is."""
  if not isinstance(x, tf.SparseTensor):
    return x, None
  x = tf.sparse.reorder(x)
  values = tf.cast(x.values, tf.float32)
  if impute == 'mean':
    fill = tft.mean(values, name=f'impute_mean_{name}')
  else:
    fill = tf.constant(0.0 if impute in (None, 'zero') else float(impute))
  shape = tf.stack([x.dense_shape[0], tf.constant(1, tf.int64)])
  present = tf.sparse.to_dense(tf.SparseTensor(
      x.indices, tf.ones_like(values), shape))[:, 0]
  dense = tf.sparse.to_dense(tf.SparseTensor(x.indices, values, shape))[:, 0]
  dense = dense + (1.0 - present) * fill
  missing = tf.cast(1.0 - present, tf.int64)
  return dense, missing


def preprocessing_fn(inputs: Mapping[str, tf.Tensor], *,
                     numeric: Mapping[str, Mapping[str, Any]],
                     bucketize: Mapping[str, Mapping[str, Any]],
                     categorical: Mapping[str, Mapping[str, int]]
                     ) -> Dict[str, tf.Tensor]:
  """Raw feature tensors -> transformed tensors; settings keyed by feature."""
  out = {}
  for name, opts in numeric.items():
    x, missing = _dense(inputs[name], opts.get('impute'), name)
    x = tf.cast(x, tf.float32)
    if opts['scale'] == 'log_z_score':
      x = _signed_log1p(x)
    if opts['scale'] in ('z_score', 'log_z_score'):
      x = tft.scale_to_z_score(x, name=f'z_{name}')
    out[transformed_name(name)] = x
    if opts.get('indicator'):
      out[indicator_name(name)] = missing
  for name, opts in bucketize.items():
    x, missing = _dense(inputs[name], opts.get('impute'), name)
    out[transformed_name(name)] = tft.bucketize(
        tf.cast(x, tf.float32), num_buckets=int(opts['buckets']),
        name=f'bucketize_{name}')
    if opts.get('indicator'):
      out[indicator_name(name)] = missing
  for name, opts in categorical.items():
    x = inputs[name]
    if isinstance(x, tf.SparseTensor):
      # A missing category is a value of its own ('' or -1).
      default = '' if x.dtype == tf.string else -1
      x = tf.sparse.to_dense(tf.SparseTensor(
          x.indices, x.values,
          tf.stack([x.dense_shape[0], tf.constant(1, tf.int64)])),
          default_value=default)[:, 0]
    out[transformed_name(name)] = tft.compute_and_apply_vocabulary(
        x, num_oov_buckets=int(opts.get('oov_buckets', 0)),
        vocab_filename=name, name=f'vocab_{name}')
  return out


def make_preprocessing_fn(dataset):
  """The dataset's preprocessing_fn: `preprocessing_fn` bound to its settings.

  A functools.partial of a top-level function, so it pickles.
  """
  t = dataset.transform
  return functools.partial(
      preprocessing_fn, numeric=dict(t.get('numeric', {})),
      bucketize=dict(t.get('bucketize', {})),
      categorical=dict(t.get('categorical', {})))


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


def analyzer_digest(transform_dir: str) -> str:
  """sha256 of what the analyzers learned, for a tft output dir (or its
  transform_fn/ folder): every constant of the transform graph (tf.Transform
  writes each analyzer's result, a mean, a variance, quantile boundaries,
  into the SavedModel as a constant) and every asset file (the
  vocabularies). The SavedModel's own bytes cannot serve: node and function
  names differ between two writes of one graph. The constants are hashed
  as a sorted multiset of serialized tensors, so the digest is equal for
  equal analyzer outputs and changes with any of them."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from apache_beam.io.filesystems import FileSystems
  from tensorflow.core.protobuf import saved_model_pb2
  root = transform_dir.rstrip('/')
  if not FileSystems.exists(f'{root}/saved_model.pb'):
    root = f'{root}/transform_fn'
  with FileSystems.open(f'{root}/saved_model.pb') as f:
    saved = saved_model_pb2.SavedModel.FromString(f.read())
  constants = []
  for graph in saved.meta_graphs:
    nodes = list(graph.graph_def.node)
    for function in graph.graph_def.library.function:
      nodes += function.node_def
    constants += [n.attr['value'].tensor.SerializeToString(deterministic=True)
                  for n in nodes if n.op == 'Const']
  digest = hashlib.sha256()
  for constant in sorted(constants):
    digest.update(hashlib.sha256(constant).digest())
  assets = f'{root}/assets/'
  found = FileSystems.match([assets + '**'])[0].metadata_list if \
      FileSystems.exists(assets) else []
  for path in sorted(m.path for m in found):
    with FileSystems.open(path) as f:
      digest.update(path[len(assets):].encode('utf-8') + b'\0' +
                    hashlib.sha256(f.read()).digest())
  return digest.hexdigest()
