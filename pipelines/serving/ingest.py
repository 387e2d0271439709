"""The upload endpoint: records sent over HTTP, validated on arrival and
landed where the batch job reads them (a Starlette application; the
command is pipelines/ingest.py).

  POST /ingest?format=jsonl|csv   a body of records -> 200 {dataset,
                                  format, records, accepted, dead_lettered,
                                  landed, dead_letter: [rows]}; 400 no or
                                  an unknown format; 413 a body over
                                  max_body_bytes (refused before it is read
                                  whole)
  GET  /healthz                   200 {status, dataset, landing}

Every record goes through the batch job's own parse and validate step: the
body is read by the format's reader (transforms.formats, the same raw
batches as a file) and checked by `BatchValidator`, which hands the rows
it doubts to `RecordValidator.validate`. Its dead-letter rows are in the
answer, with `source_file` the upload's name and `position` the record's
number in the body.

The accepted records land as one new file per upload in the landing
folder, `upload-<first 16 hex of the body's sha256><ext>`, in the upload's
own format (a CSV keeps its header) and holding each accepted record's
text as sent, so the batch job reads exactly them (`--input
'<landing>/*.jsonl'`). The file is written to a temporary file, flushed,
fsynced and renamed (pipelines.outputs.files.write_atomic; one upload on
gs:// or s3://) before the answer: a 200 means the records are on disk,
and a process killed before it leaves no part of them. The same body sent
twice lands as the same file, not twice; ids repeated within or across
uploads are the batch job's to drop (its one duplicate rule).

With a `KafkaPublisher`, the accepted records are also sent to a Kafka
topic the streaming job reads (one JSON object per message, keyed by the
declared entity so an entity's records stay in order on one partition),
after they landed and before the answer, which waits for the broker's
acknowledgement of every message (acks=all). A record of a CSV upload is
sent as the JSON object of its declared columns as written (strings, which
the parser converts as it does a CSV's).
"""

import hashlib
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.compute as pc

from pipelines.base.errors import ProjectError, UsageError
from pipelines.outputs import files
from schemas.dataset import Dataset
from transforms.formats import REGISTRY, text_formats
from transforms.formats.text import BOM
from transforms.parse import BatchValidator
from transforms.read import POSITION, RAW, raw_records, read_batches


class BadUpload(UsageError, ValueError):
  """The upload cannot be read as asked (400)."""


class BodyTooLarge(UsageError, ValueError):
  """The body is over the configured size (413)."""
  http_status = 413


class KafkaPublisher:
  """Sends accepted records to a Kafka topic and waits for the broker."""

  def __init__(self, bootstrap_servers: str, topic: str,
               timeout_s: float = 30.0):
    from kafka import KafkaProducer  # pylint: disable=g-import-not-at-top
    self.topic, self._timeout = topic, timeout_s
    self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers,
                                   acks='all', linger_ms=5)

  def publish(self, messages: List[Tuple[Optional[bytes], bytes]]):
    """(key, value) pairs; returns once the broker has every one."""
    futures = [self._producer.send(self.topic, key=key, value=value)
               for key, value in messages]
    self._producer.flush(self._timeout)
    for future in futures:
      future.get(timeout=self._timeout)   # raises when one was not taken

  def close(self):
    self._producer.close()


class Landing:
  """Validates uploads of one declared dataset and lands the accepted
  records in `folder` (local, gs:// or s3://), and on a Kafka topic with
  a `publisher`."""

  def __init__(self, dataset: Dataset, folder: str, max_body_bytes: int,
               reference_micros: Optional[int] = None,
               publisher: Optional[KafkaPublisher] = None):
    self.dataset, self.folder = dataset, folder
    self.max_body_bytes = max_body_bytes
    self.publisher = publisher
    self._validator = BatchValidator(dataset, reference_micros)

  def format_of(self, name: Optional[str]):
    formats = text_formats()
    if name not in formats:
      raise BadUpload(f'give ?format= one of {", ".join(formats)} (the '
                      f'body\'s record format), not {name!r}')
    return REGISTRY[name]

  def accept(self, body: bytes, format_name: Optional[str]
             ) -> Dict[str, Any]:
    """Validates the records of `body` and lands the accepted ones (the
    module docstring); returns the answer. Blocking: run it off the event
    loop."""
    fmt = self.format_of(format_name)
    if len(body) > self.max_body_bytes:
      raise BodyTooLarge(self.too_large())
    name = f'upload-{hashlib.sha256(body).hexdigest()[:16]}' + (
        fmt.extensions[0])
    texts, dead, read, messages = [], [], 0, []
    with tempfile.TemporaryDirectory(prefix='mlpipe_upload_') as folder:
      path = os.path.join(folder, name)
      with open(path, 'wb') as f:
        f.write(body)
      for raw in read_batches(path, self.dataset, fmt.name):
        read += raw.num_rows
        valid, rows = self._validator.validate(raw)
        accepted = pc.is_in(raw.column(POSITION),
                            value_set=valid.column(POSITION))
        texts += raw.column(RAW).filter(accepted).to_pylist()
        if self.publisher is not None:
          messages += self._messages(raw.filter(accepted))
        for row in rows:
          row['source_file'] = name
          row['message'] = row['message'].replace(path, name)
        dead += rows
    landed = None
    if texts:
      header = []
      if fmt.header_records:
        lines = fmt.records(body.removeprefix(BOM))
        header = [lines.line(i) for i in range(fmt.header_records)]
      landed = files.join(self.folder, name)
      files.write_atomic(landed, ('\n'.join(header + texts) + '\n').encode(
          'utf-8'))
    if messages:
      self.publisher.publish(messages)
    answer = {'dataset': self.dataset.name, 'format': fmt.name,
              'records': read, 'accepted': len(texts),
              'dead_lettered': len(dead), 'landed': landed,
              'dead_letter': dead}
    if self.publisher is not None:
      answer['published'] = {'topic': self.publisher.topic,
                             'messages': len(messages)}
    return answer

  def _messages(self, accepted) -> List[Tuple[Optional[bytes], bytes]]:
    """(entity key, JSON value) of each accepted record of a raw batch:
    the record's values as read (raw_records: the fields a JSON line gave,
    or a CSV row's strings), without the missing ones."""
    entity = self.dataset.entity_field
    out = []
    for record in raw_records(accepted):
      values = {k: v for k, v in record.values.items() if v is not None}
      key = values.get(entity) if entity else None
      out.append((None if key is None else str(key).encode('utf-8'),
                  json.dumps(values, ensure_ascii=False).encode('utf-8')))
    return out

  def too_large(self) -> str:
    return (f'the body is over {self.max_body_bytes} bytes '
            '(--max_body_bytes): send the records in smaller uploads')


async def _body(request, landing: Landing) -> bytes:
  """The request's body, refused (413) as soon as it is over the limit:
  by its Content-Length before a byte is read, else while it streams."""
  declared = request.headers.get('content-length', '')
  if declared.isdigit() and int(declared) > landing.max_body_bytes:
    raise BodyTooLarge(landing.too_large())
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > landing.max_body_bytes:
      raise BodyTooLarge(landing.too_large())
    chunks.append(chunk)
  return b''.join(chunks)


def make_app(landing: Landing):
  """The Starlette application around a Landing."""
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top

  async def ingest(request):
    name = request.query_params.get('format')
    landing.format_of(name)   # a bad format: 400 before the body is read
    body = await _body(request, landing)
    return JSONResponse(await run_in_threadpool(landing.accept, body, name))

  async def healthz(request):
    return JSONResponse({'status': 'ok', 'dataset': landing.dataset.name,
                         'landing': landing.folder})

  async def answer_error(request, error: ProjectError):
    """The one place the library's errors become HTTP answers."""
    return JSONResponse({'error': str(error)},
                        status_code=error.http_status)

  return Starlette(routes=[Route('/ingest', ingest, methods=['POST']),
                           Route('/healthz', healthz, methods=['GET'])],
                   exception_handlers={ProjectError: answer_error})
