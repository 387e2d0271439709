"""The upload endpoint: validate records on arrival, land them for the
batch job.

    python -m pipelines.ingest --schema interactions --landing data/landing \\
        --port 8090 [--max_body_bytes 16777216] \
        [--bootstrap_servers 127.0.0.1:9092 --topic interactions]

  POST /ingest?format=jsonl|csv  a body of records -> 200 {records,
                                 accepted, dead_lettered, landed,
                                 dead_letter: [rows]}; 400 no or an
                                 unknown format; 413 a body over
                                 --max_body_bytes
  GET  /healthz                  200

then `python -m pipelines.batch --schema interactions --input
'data/landing/*.jsonl'` reads exactly the accepted records. A thin shell:
flags and start-up checks here, the application in
pipelines/serving/ingest.py, served by uvicorn.

Exit codes: 2 for bad flags, a declaration that cannot be read or a
landing folder that cannot be written, one line on stderr before
anything is served.
"""

import argparse
import os
import sys
from typing import List, Optional

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.serving.ingest import KafkaPublisher, Landing, make_app
from schemas.dataset import load_dataset

DEFAULT_MAX_BODY = 16 << 20


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse_flags(argv: Optional[List[str]]) -> argparse.Namespace:
  p = _Parser(prog='python -m pipelines.ingest',
              description='Validate uploaded records and land them for '
              'the batch job.')
  p.add_argument('--schema', default='transactions',
                 help='Dataset declaration: a name in schemas/ or a .yaml.')
  p.add_argument('--landing', required=True,
                 help='Folder (local, gs:// or s3://) the accepted records '
                 'land in, one file per upload; the batch job\'s --input.')
  p.add_argument('--max_body_bytes', type=int, default=DEFAULT_MAX_BODY,
                 help='A larger body is answered 413 (default 16 MiB).')
  p.add_argument('--bootstrap_servers', default=None,
                 help='host:port[,...] of Kafka brokers: also send the '
                 'accepted records to --topic (the streaming job\'s input).')
  p.add_argument('--topic', default=None,
                 help='Kafka topic of --bootstrap_servers.')
  p.add_argument('--host', default='127.0.0.1')
  p.add_argument('--port', type=int, default=8090)
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    raise UsageError(f'--port {args.port}: give a port in 1..65535')
  if args.max_body_bytes <= 0:
    raise UsageError('--max_body_bytes must be positive')
  if bool(args.bootstrap_servers) != bool(args.topic):
    raise UsageError('--bootstrap_servers and --topic go together')
  return args


def _check_landing(folder: str):
  """A local landing folder is created and written once (a probe)."""
  if '://' in folder:
    return
  try:
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, '.write_test')
    with open(probe, 'wb'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UsageError(f'--landing {folder} cannot be written: '
                     f'{e.strerror}') from None


def _publisher(args: argparse.Namespace):
  """A Kafka publisher when asked for; a broker that does not answer is
  exit 2 before anything is served."""
  if not args.bootstrap_servers:
    return None
  from kafka.errors import KafkaError  # pylint: disable=g-import-not-at-top
  try:
    return KafkaPublisher(args.bootstrap_servers, args.topic)
  except KafkaError as e:
    raise UsageError(f'--bootstrap_servers {args.bootstrap_servers}: no '
                     f'Kafka broker answers ({type(e).__name__})') from None


def build_app(args: argparse.Namespace):
  dataset = load_dataset(args.schema)
  _check_landing(args.landing)
  return make_app(Landing(dataset, args.landing, args.max_body_bytes,
                          publisher=_publisher(args)))


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    try:
      parse_flags(['--help'])
    except SystemExit:
      return 0
  started = run_command(lambda: (lambda a: (a, build_app(a)))(
      parse_flags(argv)))
  if isinstance(started, int):
    return started
  args, app = started
  import uvicorn  # pylint: disable=g-import-not-at-top
  print(f'Accepting uploads on http://{args.host}:{args.port}/ingest into '
        f'{args.landing}', file=sys.stderr, flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level='warning',
              access_log=False)
  return 0


if __name__ == '__main__':
  sys.exit(main())
