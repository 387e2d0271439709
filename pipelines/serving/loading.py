"""Loading a model to serve: verified, traced once, the heap frozen."""

import dataclasses
import gc

from transforms.inference import LoadedModel, TransformedSklearnModelHandler


_TF_TYPES = {'string': 'string', 'float': 'float32', 'int': 'int64',
             'timestamp': 'int64'}


def load_model(model_dir: str) -> LoadedModel:
  """The project's verified loader: hashes, signature and skops' safe
  format are checked before anything in the folder is loaded. The
  transform layer is then traced once into a concrete function of fixed
  signature (every raw feature a [rows] tensor, of the types
  `raw_feature_tensors` makes; an optional one a [rows, 1] sparse
  tensor): the same graph, called without eager dispatch or tf.function's
  per-call signature matching, which cost more than the graph on a small
  batch. The parity tests check the scores equal the batch job's."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = TransformedSklearnModelHandler(model_dir).load_model()
  metadata = model.metadata
  optional = set(metadata.get('optional_features', ()))
  spec = {}
  for name, ftype in metadata['raw_features'].items():
    dtype = tf.as_dtype(_TF_TYPES[ftype])
    spec[name] = (tf.SparseTensorSpec([None, 1], dtype) if name in optional
                  else tf.TensorSpec([None], dtype))
  graph = tf.function(model.transform_layer).get_concrete_function(spec)
  return dataclasses.replace(model, transform_layer=graph)


def freeze_heap():
  """Moves every object alive now (TensorFlow, the model, the side
  tables: ~600k objects) out of reach of the garbage collector's full
  collections, which would otherwise walk them all now and then, a
  pause of ~0.5 s on a busy machine in the middle of requests (the p99).
  Called once the model is loaded, and after a champion swap (unfrozen,
  collected, frozen again, so the old model's cycles are freed: one such
  pause per swap)."""
  gc.unfreeze()
  gc.collect()
  gc.freeze()
