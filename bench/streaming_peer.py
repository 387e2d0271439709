"""The peer of the Kafka -> Flink bench: one plain Python process, no Beam
runner, that consumes the same topic with a Kafka client and computes the
same features and scores with the project's own functions, a poll at a
time:

  records: the batch reader (transforms.read.read_batches) on the poll's
  values; validation: transforms.parse.BatchValidator; duplicates: ids
  seen before; history features: transforms.history_features.history_table
  over every valid record so far, keeping the poll's rows; scores:
  transforms.inference.predict_table with the model of --model_dir.

    python -m bench.streaming_peer --bootstrap_servers 127.0.0.1:9092 \\
        --topic T --events N --model_dir M

prints one JSON line: events scored, seconds from the first poll to the
last score, events per second. bench/streaming.py runs it beside Flink.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import load_dataset
from transforms.history_features import history_table
from transforms.inference import TransformedSklearnModelHandler, predict_table
from transforms.parse import BatchValidator
from transforms.read import read_batches


def run(bootstrap: str, topic: str, events: int, model_dir: str,
        schema: str = 'transactions', idle_s: float = 30) -> dict:
  # librdkafka's consumer, as the bench's producer (a plain Python
  # process at its best).
  from confluent_kafka import Consumer  # pylint: disable=import-outside-toplevel
  dataset = load_dataset(schema)
  model = TransformedSklearnModelHandler(model_dir).load_model()
  validator = BatchValidator(dataset)
  names = dataset.batch_schema().names
  consumer = Consumer({'bootstrap.servers': bootstrap,
                       'group.id': f'peer-{os.getpid()}-{time.time_ns()}',
                       'auto.offset.reset': 'earliest',
                       'enable.auto.commit': False})
  consumer.subscribe([topic])
  work = tempfile.mkdtemp(prefix='peer-')
  path = os.path.join(work, 'poll.jsonl')
  history, seen = None, pa.array([], pa.string())
  read = scored = 0
  first = last = None
  try:
    while read < events:
      values = [m.value() for m in consumer.consume(num_messages=5000,
                                                    timeout=1.0)
                if m.error() is None]
      if not values:
        if first is not None and time.monotonic() - last > idle_s:
          break
        continue
      first = first or time.monotonic()
      read += len(values)
      with open(path, 'wb') as f:
        f.write(b'\n'.join(values) + b'\n')
      for raw in read_batches(path, dataset, 'jsonl'):
        valid, _ = validator.validate(raw)
        batch = pa.Table.from_batches([valid]).select(names)
        fresh = pc.invert(pc.is_in(batch.column(dataset.id_field),
                                   value_set=seen))
        batch = batch.filter(fresh)
        ids = batch.column(dataset.id_field).combine_chunks()
        seen = pa.concat_arrays([seen, ids])
        history = batch if history is None else pa.concat_tables(
            [history, batch])
        features = history_table(history, dataset)
        mine = features.filter(pc.is_in(features.column(dataset.id_field),
                                        value_set=ids))
        predictions = predict_table(model, mine, dataset.id_field)
        scored += predictions.num_rows
      last = time.monotonic()
  finally:
    consumer.close()
  seconds = (last - first) if first else 0.0
  return {'events': read, 'scored': scored, 'seconds': seconds,
          'events_per_s': scored / seconds if seconds else 0.0}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--bootstrap_servers', required=True)
  parser.add_argument('--topic', required=True)
  parser.add_argument('--events', type=int, required=True)
  parser.add_argument('--model_dir', required=True)
  args = parser.parse_args(argv)
  print(json.dumps(run(args.bootstrap_servers, args.topic, args.events,
                       args.model_dir)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
