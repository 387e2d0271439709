"""The scoring service: score one raw record now, from the online store.

    python -m pipelines.serve --registry data/registry \\
        --online_store redis://127.0.0.1:6379/0 --port 8080

  POST /score[?update=true]  a raw record (JSON object) -> 200 {score,
                             predicted_label, risk_category, confidence,
                             model_version, features, ...}; 400 with the
                             dead-letter kind, field and message for a bad
                             record; 503 when the store is down or slow
  GET  /healthz              200 when the store answers, else 503
  GET  /metrics              Prometheus text format

Per request, the same code as batch and streaming: `RecordValidator`
(through `decode_message`, the streaming source's decoder) validates the
record; the declared side tables (read and validated at start-up, as the
batch job reads them; --side_table NAME=PATH) are joined by key; the
entity's stored records (transforms.online_store) and the record go
through `history_features`, so its features are those the batch job gives
it when the store holds its history; the model directory's transform
graph and estimator score the row (`predict_table`). With `?update=true`
the record and its features are merged into the store afterwards (the
same script as the batch and streaming writers).

The web framework is Starlette on uvicorn: a small, well-kept ASGI
toolkit (FastAPI is built on it) with a test client, and nothing we do
not use. A request is prepared (validation, store read, features) on the
event loop; rows of concurrent requests are then scored together in one
graph and model call on a worker thread (`Batcher`), while the loop reads
the next requests. The store's socket timeouts (--store_timeout_ms) bound
how long a request can wait for Redis. With --registry the champion is
polled (--model_poll_seconds) and a new one served without a restart
(`ChampionFollower`).

Exit codes: 2 for bad flags, a store that does not answer, a model that
fails verification, a side table that cannot be read or a declaration
the service cannot serve, each one line on stderr before anything is
served.
"""

import sys

from pipelines.serving.service import main

if __name__ == '__main__':
  sys.exit(main())
