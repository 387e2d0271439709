"""Loading a model to serve: verified, traced once, the heap frozen."""

import gc

from transforms.inference import LoadedModel, TransformedSklearnModelHandler


def load_model(model_dir: str) -> LoadedModel:
  """The project's verified loader: hashes, signature and skops' safe
  format are checked before anything in the folder is loaded; the
  transform layer comes traced once into a concrete function of fixed
  signature (inference.traced_transform), as every scoring path gets it:
  the same graph, called without eager dispatch or tf.function's per-call
  signature matching, which cost more than the graph on a small batch.
  The parity tests check the scores equal the batch job's."""
  return TransformedSklearnModelHandler(model_dir).load_model()


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
