"""Materialising the online store: the batch job's last step writes every
entity's state as of the end of its input into Redis (transforms.online_store
holds the store's records and writers)."""

from typing import Any, Dict, Optional

import apache_beam as beam
import redis

from pipelines.outputs import summary as summary_lib
from schemas.dataset import Dataset
from transforms import online_store
from transforms.feature_rows import ReadFeatureRows


def materialise(options, dataset: Dataset, features_glob: str, url: str,
                model_version: Optional[str], num_shards: int
                ) -> Dict[str, Any]:
  """The batch job's last step: a Beam job that reads the run's feature
  rows and writes every entity's state as of the end of the input; returns
  what the run summary says of it (counts from the job's counters)."""
  client = online_store.connect(url, 2.0)
  try:
    online_store.write_meta(client, dataset, online_store.DEFAULT_MAX_RECORDS)
    meta_written = True
  except redis.RedisError:
    meta_written = False      # said in the summary; the states still go
  client.close()
  p = beam.Pipeline(options=options)
  (p
   | 'ReadFeatures' >> ReadFeatureRows(features_glob)
   | 'online_store.WriteOnlineStore' >> online_store.WriteOnlineStore(dataset, url, model_version,
                                            num_shards=num_shards))
  result = p.run()
  result.wait_until_finish()
  counts = summary_lib.counters(result)
  return {'url': online_store.shown_url(url), 'model_version': model_version,
          'entities_written': counts.get('online_store_entities_written', 0),
          'records_written': counts.get('online_store_records_written', 0),
          'retries': counts.get('online_store_retries', 0),
          'writes_failed': counts.get('online_store_entities_failed', 0),
          'records_failed': counts.get('online_store_records_failed', 0),
          'meta_written': meta_written}
