"""mlpipe: portable Apache Beam pipelines from raw events to predictions.

The pins are exact on purpose. TensorFlow Data Validation 1.16.1 is the newest
TFDV with Python 3.11 wheels and needs pyarrow<11 (it brings tfx-bsl 1.16.1,
TensorFlow 2.16.2, pyarrow 10.0.1, numpy 1.26, pandas 1.5). Beam 2.76+ needs
pyarrow>=14, so Beam cannot move past 2.75 until TFDV does; 2.75 satisfies
the pins but sends pip's resolver into a long backtrack, while 2.72.0 resolves
from scratch in about two minutes. The other pins are the versions that
resolve beside that stack today.
"""

from setuptools import find_packages, setup

REQUIRED = [
    # tfx-bsl imports dill, which Beam now ships only as its [dill] extra;
    # [aws] is Beam's own S3 file system (s3:// paths, boto3).
    'apache-beam[gcp,aws,dill]==2.72.0',
    'tensorflow-data-validation==1.16.1',
    'tensorflow-transform==1.16.0',
    'scikit-learn==1.9.1',
    'fastavro==1.13.1',
    'google-cloud-storage==2.18.2',
    'PyYAML==6.0.4',
    'threadpoolctl==3.8.0',   # scikit-learn's; imported by the scorer
    # Models are stored in skops' format: loading one runs no code from it.
    'skops==0.16.0',
    # The run report's plots (ROC, PR, calibration, scores), SVG backend.
    'matplotlib==3.11.2',
    # The online store and the scoring service (pipelines.serve): redis-py,
    # Starlette (a small ASGI toolkit with a test client) on uvicorn, and
    # Prometheus metrics.
    'redis==8.1.0',
    # redis-py's C reply parser, which it takes when installed (silently its
    # own Python parser when not): ~60 us less CPU per store read on the
    # service's event loop, which every request shares (bench/RESULTS.md).
    'hiredis==3.5.0',
    'starlette==1.10.0',
    'uvicorn==0.54.0',
    # uvicorn's C event loop (libuv) and HTTP parser, named in
    # pipelines/serve.py: less CPU per request than asyncio's loop and the
    # pure-Python h11, on the loop that shares the GIL with the model.
    'uvloop==0.23.0',
    'httptools==0.9.0',
    # metrics.prom, the streaming job's /metrics and the service's /metrics.
    'prometheus-client==0.26.0',
    # PostgreSQL in and out (--input postgresql://, --sink): ADBC's libpq
    # driver (libpq inside the wheel) moves Arrow batches by binary COPY.
    # Its DBAPI extra wants pyarrow>=14, which TFDV forbids: we use only
    # the calls that work on pyarrow 10 (RecordBatchReader in and out).
    'adbc-driver-manager==1.13.0',
    'adbc-driver-postgresql==1.13.0',
    # What the three pins above bring, pinned too: without them pip's
    # resolver backtracks into old pyarrow releases that have no wheel for
    # Python 3.11 and fails building one from source.
    'tfx-bsl==1.16.1',
    'tensorflow==2.16.2',
    'tensorflow-metadata==1.16.1',
    'pyarrow==10.0.1',
    'numpy==1.26.4',
    'pandas==1.5.3',
    'protobuf==4.25.9',
    # What Beam's [aws] extra brings, as pip resolved it beside the stack.
    'boto3==1.44.18',
    'botocore==1.44.18',
    's3transfer==0.19.3',
    # --input https://...: a paginated JSON API (transforms/http_source.py).
    'requests==2.34.2',
    # pipelines.ingest --bootstrap_servers: accepted uploads to a Kafka
    # topic (and the Kafka-on-Flink tests and bench produce and read with it).
    'kafka-python==3.0.12',
]

TESTS = [
    # bench/streaming.py's producer and consumers: librdkafka (C) sends
    # 100,000 events with ~1 s of CPU where kafka-python takes ~10 s, CPU
    # the Flink job under test would otherwise lose on two cores.
    'confluent-kafka==2.6.1',
    'pytest==9.2.0',
    'hypothesis==6.170.17',
    # A local GCS server for the gs:// tests (127.0.0.1 only).
    'gcp-storage-emulator==2026.7.19',
    # A local S3 server for the s3:// tests (moto's server mode, 127.0.0.1).
    'moto[server]==5.2.6',
    # Starlette's TestClient and the scoring-service tests and bench.
    'httpx==0.28.1',
    # Drives headless Chromium over the DevTools protocol (report test).
    'websocket-client==1.9.2',
]

setup(
    name='mlpipe',
    version='0.1.0',
    description='Portable Beam pipelines: ingestion, features, validation, '
                'tf.Transform, scikit-learn training and RunInference.',
    # TFDV 1.16.1 ships wheels for CPython 3.9-3.11 only.
    python_requires='>=3.9,<3.12',
    packages=find_packages(include=['pipelines', 'pipelines.*', 'transforms',
                                    'transforms.*', 'schemas', 'schemas.*',
                                    'runners', 'runners.*']),
    package_data={'schemas': ['*.yaml', '*.avsc', '*.pbtxt']},
    install_requires=REQUIRED,
    extras_require={'test': TESTS},
)
