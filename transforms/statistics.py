"""Feature statistics of the gold (feature) table with TFDV.

`GenerateFeatureStatistics` turns feature RecordBatches into one
DatasetFeatureStatisticsList; `WriteStatistics` writes it as a single binary
proto file (`stats.pb`, the TFX StatisticsGen convention) and
`read_statistics` reads it back, whatever format it was written in.
"""

from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from pipelines.base.quiet import import_tfdv
tfdv = import_tfdv()
from google.protobuf.message import DecodeError
from tensorflow_metadata.proto.v0 import statistics_pb2

from schemas.dataset import Dataset
from transforms.arrow import ToTFXIOBatches

STATS_FILE = 'stats.pb'


def stats_options(dataset: Dataset, **overrides) -> tfdv.StatsOptions:
  """StatsOptions for the feature table; keyword arguments override.

  The schema tells TFDV which columns are categorical. No label_feature:
  it would add lift statistics, a cross-feature shuffle per value. The
  sketch-based top-k/uniques generator is one combiner with bounded
  memory, where the exact one shuffles every distinct value (a million
  transaction ids) and takes about twice as long. Its top-k is exact below
  1024 distinct values, which covers every categorical feature with a
  domain; only id-like columns get estimated unique counts and top-value
  frequencies.
  """
  options = dict(
      schema=dataset.tfdv_schema(),
      num_top_values=20,
      frequency_threshold=1,
      num_rank_histogram_buckets=100,
      num_values_histogram_buckets=10,
      num_histogram_buckets=20,
      num_quantiles_histogram_buckets=10,
      use_sketch_based_topk_uniques=True,
  )
  options.update(overrides)
  return tfdv.StatsOptions(**options)


class GenerateFeatureStatistics(beam.PTransform):
  """PCollection[pa.RecordBatch] -> PCollection[DatasetFeatureStatisticsList].

  Input: feature batches with the flat columns of
  `dataset.batch_schema(dataset.feature_types())` (a null is a missing
  value); output: exactly one statistics element. Each batch becomes TFXIO
  list columns of at most `batch_size` rows, which TFDV reads directly.
  """

  def __init__(self, dataset: Dataset,
               options: Optional[tfdv.StatsOptions] = None,
               batch_size: int = 10000):
    super().__init__()
    self._dataset = dataset
    self._options = options or stats_options(dataset)
    self._batch_size = batch_size

  def expand(self, batches):
    return (batches
            | 'ToTFXIOBatches' >> ToTFXIOBatches(
                self._dataset.feature_types(), max_rows=self._batch_size)
            | 'GenerateStatistics' >> tfdv.GenerateStatistics(self._options))


class WriteStatistics(beam.PTransform):
  """PCollection[DatasetFeatureStatisticsList] (one element) -> PDone.

  Writes one unsharded binary proto file at `path`, readable by
  `tfdv.load_stats_binary` and `read_statistics`.
  """

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, stats):
    return stats | 'WriteStatsPb' >> tfdv.WriteStatisticsToBinaryFile(
        self._path)


def read_statistics(path: str) -> statistics_pb2.DatasetFeatureStatisticsList:
  """Loads statistics written as a binary proto, a TFRecord or a text proto.

  `tfdv.load_statistics` reads only the TFRecord and text forms, so the
  binary form (what `WriteStatistics` writes) is tried first, through
  Beam's FileSystems: TensorFlow's own gs:// client ignores
  STORAGE_EMULATOR_HOST, Beam's does not.
  """
  with FileSystems.open(path) as f:
    data = f.read()
  try:
    stats = statistics_pb2.DatasetFeatureStatisticsList.FromString(data)
    if stats.datasets:
      return stats
  except DecodeError:
    pass  # Not a binary proto; TFDV tries the other forms.
  return tfdv.load_statistics(path)
