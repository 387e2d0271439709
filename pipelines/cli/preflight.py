"""Runner preflight: catch a command line that cannot work before Beam starts.

    check_runner(options)   # raises PreflightError with one clear line

A wrong runner setup otherwise fails late and obscurely: a Dataflow job whose
workers cannot import this project, a Flink job that writes "local" outputs
inside worker containers, or a driver that retries Google credentials and
default buckets over the network for minutes. Every check here is local: no
network call, nothing read or written (the credentials check may let
google-auth probe the GCE metadata server, only when nothing local settles
it).

Where the Python workers run decides which paths work:
  * DirectRunner, Prism, and LOOPBACK on Flink/Spark/Portable: in this
    process, so local paths are fine (LOOPBACK workers listen on localhost,
    so the cluster has to be on this machine too);
  * DOCKER: in SDK containers, which do not see this machine's files even
    on a local cluster;
  * PROCESS / EXTERNAL: on the cluster's machines, local only when the
    cluster (--flink_master, --spark_master_url, --job_endpoint) is;
  * DataflowRunner: on Google Cloud VMs, always remote.
Remote workers need shared storage (gs://) for --input, --output_dir and
--model_dir, and this project's code (--setup_file, --extra_package or an
SDK container image that has it installed).

    check_services(options)   # the services the run needs answer
    check_kafka(opts)         # streaming from Kafka: jar and broker

are the checks that do touch the network, once each and briefly: the Flink
REST endpoint of --flink_master answers, the Kafka brokers accept a
connection; and the local jars they need (runners/fetch_jars.sh) exist.
"""

import os
import re
import shutil
import socket
import urllib.request
import zipfile
from typing import Dict, Optional
from urllib.parse import urlparse

from apache_beam.options.pipeline_options import PipelineOptions

import pipelines.cli.options  # noqa: F401  (registers our options' flags)

from pipelines.base.errors import UsageError


class PreflightError(UsageError, ValueError):
  """The command line cannot work with the chosen runner (one line)."""


# Beam's own patterns (apache_beam/options/pipeline_options_validator.py): a
# temp location Beam rejects makes it try to create a default bucket over
# the network, which hangs a machine without one.
_GCS_BUCKET = re.compile(r'^[a-z0-9][-_a-z0-9.]{1,220}[a-z0-9]$')
_PROJECT_ID = re.compile(r'^[a-z][-a-z0-9:.]+[a-z0-9]$')
_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')

_MAGIC_FLINK_MASTERS = ('[auto]', '[local]')
_LOCAL_HOSTS = ('localhost', '127.0.0.1', '::1', '0.0.0.0', '')
_PORTABLE = ('flinkrunner', 'sparkrunner', 'portablerunner', 'prismrunner')
_DATAFLOW = ('dataflowrunner', 'testdataflowrunner')
_ENV_URNS = {'beam:env:docker:v1': 'DOCKER', 'beam:env:process:v1': 'PROCESS',
             'beam:env:external:v1': 'EXTERNAL'}
# Paths the Python workers open (--baseline_stats is read by the driver).
_WORKER_PATHS = ('input', 'output_dir', 'model_dir')
_ALL_PATHS = _WORKER_PATHS + ('baseline_stats',)
# Read by google-auth's own GCE residency check (no network).
_DMI_PRODUCT_NAME = '/sys/class/dmi/id/product_name'


def check_flags(argv) -> None:
  """Refuses a flag that neither we nor Beam define (a misspelled
  --ouput_dir would otherwise be dropped with a warning and the run would
  write to the default folder)."""
  # pylint: disable=protected-access
  from apache_beam.options.pipeline_options import _BeamArgumentParser
  parser = _BeamArgumentParser(allow_abbrev=False)
  seen = {}
  for cls in PipelineOptions.__subclasses__():
    seen.setdefault(str(cls), cls)
  for cls in seen.values():
    cls._add_argparse_args(parser)
  _, unknown = parser.parse_known_args(list(argv or []))
  flags = [a.split('=', 1)[0] for a in unknown if a.startswith('-')]
  if flags:
    raise PreflightError(f'unknown flag {flags[0]}: see --help for ours; '
                         'every other flag must be one Beam or its runner '
                         'defines')


def _flags(options: PipelineOptions) -> Dict[str, object]:
  flags = options.get_all_options(drop_default=False)
  if flags.get('input_subscription') or flags.get('input_topic'):
    flags['input'] = None  # streaming from Pub/Sub: --input is not read
  return flags


def runner_name(options: PipelineOptions) -> str:
  """The runner's class name, lower case ('dataflow' -> 'dataflowrunner')."""
  runner = _flags(options).get('runner')
  if runner is None:
    return 'directrunner'
  if not isinstance(runner, str):
    runner = type(runner).__name__
  name = runner.rsplit('.', 1)[-1].lower()
  return name if name.endswith('runner') else name + 'runner'


def is_dry_run(options: PipelineOptions) -> bool:
  """True for --dry_run (Beam's TestOptions flag: it has no type, so
  `--dry_run=False` arrives as the truthy string 'False')."""
  value = _flags(options).get('dry_run')
  if isinstance(value, str):
    return value.strip().lower() in ('true', '1', 'yes', 'y', 'on')
  return bool(value)


def is_local_path(path: str) -> bool:
  """A path on this machine's file system (no scheme, or file://)."""
  match = _SCHEME.match(path)
  return match is None or match.group(1).lower() == 'file'


def _host(address: Optional[str]) -> str:
  """'http://host:8081/x', 'host:8081', '[::1]:8081' -> the host name."""
  address = (address or '').strip()
  if not _SCHEME.match(address):
    address = 'http://' + address
  try:
    return (urlparse(address).hostname or '').lower()
  except ValueError:
    return address


def _is_local_host(host: str) -> bool:
  return (host in _LOCAL_HOSTS or host.startswith('127.') or
          host == socket.gethostname().lower())


def _environment_type(flags: Dict[str, object], runner: str) -> str:
  """The SDK worker environment the runner will use: LOOPBACK, DOCKER,
  PROCESS or EXTERNAL (Beam's defaults when --environment_type is absent)."""
  env = flags.get('environment_type')
  if env:
    env = str(env)
    return _ENV_URNS.get(env.lower(), env.upper())
  if runner == 'prismrunner':
    return 'LOOPBACK'
  if (runner == 'flinkrunner' and
      (flags.get('flink_master') or '[auto]') in _MAGIC_FLINK_MASTERS):
    return 'LOOPBACK'
  if (runner == 'sparkrunner' and
      re.match(r'^local(\[.+\])?$', flags.get('spark_master_url') or '')):
    return 'LOOPBACK'
  return 'DOCKER'


def _cluster(flags: Dict[str, object], runner: str):
  """(description, is on this machine) of where the portable job runs."""
  endpoint = flags.get('job_endpoint')
  if endpoint and runner != 'prismrunner':
    return f'--job_endpoint {endpoint}', (
        endpoint == 'embed' or _is_local_host(_host(endpoint)))
  if runner == 'flinkrunner':
    master = flags.get('flink_master') or '[auto]'
    return f'--flink_master {master}', (
        master in _MAGIC_FLINK_MASTERS or _is_local_host(_host(master)))
  if runner == 'sparkrunner':
    master = flags.get('spark_master_url') or 'local[4]'
    return f'--spark_master_url {master}', (
        master.startswith('local') or _is_local_host(_host(master)))
  return 'this machine', True


def _check_dataflow(flags: Dict[str, object]):
  project = flags.get('project')
  if not project:
    raise PreflightError('DataflowRunner needs --project (your Google Cloud '
                         'project id)')
  if not _PROJECT_ID.match(project):
    raise PreflightError(f'--project {project!r} is not a Google Cloud '
                         'project id (lower-case letters, digits, hyphens)')
  if not flags.get('region'):
    raise PreflightError('DataflowRunner needs --region (e.g. --region '
                         'us-central1)')
  temp = flags.get('temp_location')
  if not temp:
    raise PreflightError('DataflowRunner needs --temp_location '
                         'gs://BUCKET/tmp')
  for flag in ('temp_location', 'staging_location'):
    path = flags.get(flag)
    if path is None:
      continue
    if not path.startswith('gs://'):
      raise PreflightError(f'--{flag} must be a gs:// path for '
                           f'DataflowRunner, not {path}')
    bucket = path[len('gs://'):].split('/', 1)[0]
    if not _GCS_BUCKET.match(bucket):
      raise PreflightError(f'--{flag} {path}: {bucket!r} is not a valid '
                           'Cloud Storage bucket name')


def _check_packaging(flags: Dict[str, object], who: str,
                     image_flag: str = 'sdk_container_image'):
  """Remote workers must be able to import pipelines/transforms/schemas:
  from --setup_file or --extra_package (installed when a worker starts) or
  from a container image that has the project (`image_flag`)."""
  setup_file = flags.get('setup_file')
  if setup_file:
    if not os.path.isfile(setup_file):
      raise PreflightError(f'--setup_file {setup_file} does not exist')
    return
  if (flags.get('extra_packages') or flags.get('sdk_container_image') or
      flags.get(image_flag)):
    return
  raise PreflightError(
      f'{who} cannot import this project: pass --setup_file ./setup.py '
      '(or --sdk_container_image IMAGE with mlpipe installed)')


def _check_flink_job_server(flags: Dict[str, object]):
  if flags.get('job_endpoint'):
    return
  master = flags.get('flink_master') or '[auto]'
  if flags.get('flink_submit_uber_jar') and master not in (
      _MAGIC_FLINK_MASTERS):
    return  # Beam builds the uber jar in Python and posts it to Flink.
  jar = flags.get('flink_job_server_jar')
  if jar and is_local_path(jar):
    local = jar[len('file://'):] if jar.startswith('file://') else jar
    if not os.path.isfile(local):
      raise PreflightError(
          f'--flink_job_server_jar {jar} does not exist (the Beam Flink job '
          f'server jar for Flink {flags.get("flink_version")}, '
          'beam-runners-flink-<version>-job-server-<beam version>.jar)')
  java_home = os.environ.get('JAVA_HOME')
  java = (os.path.join(java_home, 'bin', 'java') if java_home
          else shutil.which('java'))
  if not java or not os.path.exists(java):
    raise PreflightError(
        'FlinkRunner starts a Java job server but no java was found '
        '(install Java 11+ or set JAVA_HOME), or pass --job_endpoint of a '
        'running Beam Flink job server')


def _check_workers(flags: Dict[str, object], runner: str):
  """Local paths and code packaging, by where the workers run."""
  local_paths = [f for f in _WORKER_PATHS
                 if flags.get(f) and is_local_path(str(flags[f]))]
  if runner in _DATAFLOW:
    if local_paths:
      flag = local_paths[0]
      raise PreflightError(
          f'--{flag} {flags[flag]} is a local path but DataflowRunner '
          'workers run on Google Cloud: use a gs:// path')
    _check_packaging(flags, 'DataflowRunner workers')
    return
  if runner not in _PORTABLE:
    return  # DirectRunner and friends: workers are local processes.
  env = _environment_type(flags, runner)
  where, cluster_is_local = _cluster(flags, runner)
  name = {'flinkrunner': 'FlinkRunner', 'sparkrunner': 'SparkRunner',
          'portablerunner': 'PortableRunner',
          'prismrunner': 'PrismRunner'}[runner]
  if env == 'LOOPBACK':
    if not cluster_is_local:
      raise PreflightError(
          f'--environment_type LOOPBACK runs the Python workers in this '
          f'process at localhost, which {where} cannot reach: use DOCKER, '
          'PROCESS or EXTERNAL workers with a remote cluster')
    return
  if local_paths:
    flag = local_paths[0]
    if env == 'DOCKER':
      raise PreflightError(
          f'--{flag} {flags[flag]} is a local path, which {name}\'s DOCKER '
          'workers cannot see: use --environment_type LOOPBACK (cluster on '
          'this machine) or gs:// paths')
    if not cluster_is_local:
      raise PreflightError(
          f'--{flag} {flags[flag]} is a local path but {name} workers run '
          f'on {where}: use gs:// paths')
  if env == 'DOCKER':
    _check_packaging(flags, f'{name}\'s DOCKER workers',
                     image_flag='environment_config')


def _on_google_cloud() -> bool:
  """GCE/GKE (google-auth's DMI check) or Cloud Run, without network."""
  if os.environ.get('K_SERVICE') or os.environ.get('CLOUD_RUN_JOB'):
    return True
  try:
    with open(_DMI_PRODUCT_NAME, encoding='utf-8') as f:
      return f.read().strip().startswith('Google')
  except OSError:
    return False


def _adc_file() -> str:
  try:
    from google.auth import _cloud_sdk  # pylint: disable=import-outside-toplevel
    return _cloud_sdk.get_application_default_credentials_path()
  except ImportError:
    config = os.environ.get('CLOUDSDK_CONFIG') or os.path.join(
        os.path.expanduser('~'), '.config', 'gcloud')
    return os.path.join(config, 'application_default_credentials.json')


def gcs_credentials_problem() -> Optional[str]:
  """None when gs:// can be reached with credentials (or an emulator), else
  why not. Cheap: environment variables and files first; google.auth.default()
  only when those do not settle it."""
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    return None
  explicit = os.environ.get('GOOGLE_APPLICATION_CREDENTIALS')
  if explicit:
    if os.path.isfile(explicit):
      return None
    return f'GOOGLE_APPLICATION_CREDENTIALS={explicit} is not a file'
  if os.path.isfile(_adc_file()) or _on_google_cloud():
    return None
  try:
    import google.auth  # pylint: disable=import-outside-toplevel
    from google.auth import exceptions  # pylint: disable=import-outside-toplevel
  except ImportError:
    return 'google-auth is not installed (pip install "apache-beam[gcp]")'
  try:
    google.auth.default()
  except exceptions.GoogleAuthError as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f'no Google credentials ({first.rstrip(".")})'
  return None


def _check_credentials(flags: Dict[str, object], runner: str):
  gs = [f for f in _ALL_PATHS if str(flags.get(f) or '').startswith('gs://')]
  if runner in _DATAFLOW:
    gs += ['temp_location']
  if not gs:
    return
  problem = gcs_credentials_problem()
  if problem:
    raise PreflightError(
        f'--{gs[0]} {flags[gs[0]]} needs Google Cloud credentials: '
        f'{problem}; run `gcloud auth application-default login`, set '
        'GOOGLE_APPLICATION_CREDENTIALS, or set STORAGE_EMULATOR_HOST for a '
        'local emulator')


def check_runner(options: PipelineOptions) -> None:
  """Raises PreflightError when the runner flags and paths cannot work."""
  flags = _flags(options)
  runner = runner_name(options)
  if runner in _DATAFLOW:
    _check_dataflow(flags)
  _check_workers(flags, runner)
  if runner == 'flinkrunner':
    _check_flink_job_server(flags)
  if not is_dry_run(options):
    _check_credentials(flags, runner)



# --- services (network) ------------------------------------------------------
_FETCH = 'runners/fetch_jars.sh fetches it'
DEFAULT_JOB_SERVER_JAR = os.path.join(
    pipelines.cli.options.REPO_ROOT, 'runners', '.jars',
    'beam-flink-job-server.jar')


def check_local_jar(flag: str, jar: str) -> None:
  """The jar exists, and so does every jar its manifest's Class-Path names
  (the launchers of runners/fetch_jars.sh are manifests over runners/.jars/
  beam/: without them `java -jar` fails late with a Java stack trace)."""
  if not os.path.isfile(jar):
    raise PreflightError(f'--{flag} {jar} does not exist ({_FETCH})')
  try:
    with zipfile.ZipFile(jar) as z:
      manifest = z.read('META-INF/MANIFEST.MF').decode('utf-8', 'replace')
  except (zipfile.BadZipFile, KeyError, OSError):
    return  # not a launcher: java reports what it finds
  text = manifest.replace('\r\n', '\n').replace('\n ', '')
  for line in text.splitlines():
    if line.startswith('Class-Path:'):
      for entry in line[len('Class-Path:'):].split():
        path = os.path.join(os.path.dirname(jar), entry)
        if not os.path.exists(path):
          raise PreflightError(f'--{flag} {jar} names {entry}, which does '
                               f'not exist ({_FETCH} again)')


def _answers(host: str, port: int, timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout).close()
    return True
  except OSError:
    return False


def check_services(options: PipelineOptions) -> None:
  """FlinkRunner: a job server jar that is here (Beam would otherwise try to
  download one from Maven Central when the job starts) and, for a cluster
  (--flink_master host:port), a Flink REST endpoint that answers."""
  if runner_name(options) != 'flinkrunner':
    return
  flags = _flags(options)
  if flags.get('job_endpoint'):
    return
  master = flags.get('flink_master') or '[auto]'
  jar = flags.get('flink_job_server_jar')
  if not jar and not flags.get('flink_submit_uber_jar'):
    raise PreflightError(
        'FlinkRunner needs --flink_job_server_jar (a local Beam Flink job '
        f'server jar; {_FETCH}: {DEFAULT_JOB_SERVER_JAR})')
  if jar and is_local_path(jar):
    check_local_jar('flink_job_server_jar',
                    jar[len('file://'):] if jar.startswith('file://') else jar)
  _check_worker_pool(flags)
  if master in _MAGIC_FLINK_MASTERS:
    return
  url = master if _SCHEME.match(master) else 'http://' + master
  try:
    with urllib.request.urlopen(url.rstrip('/') + '/overview',
                                timeout=5) as response:
      response.read()
  except (OSError, ValueError) as e:
    reason = getattr(e, 'reason', None) or e
    raise PreflightError(
        f'--flink_master {master}: no Flink REST endpoint answers ({reason}); '
        'start the local cluster with runners/flink_cluster.sh start, or use '
        '--flink_master [local]') from None


def _check_worker_pool(flags: Dict[str, object]) -> None:
  """EXTERNAL workers: a worker pool answers at --environment_config
  (runners/worker_pool.sh starts the local one)."""
  if _environment_type(flags, 'flinkrunner') != 'EXTERNAL':
    return
  address = str(flags.get('environment_config') or '')
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise PreflightError(f'--environment_config {address!r}: EXTERNAL '
                         'workers need the worker pool\'s host:port (e.g. '
                         '127.0.0.1:50000 of runners/worker_pool.sh)')
  if not _answers(host.strip('[]'), int(port)):
    raise PreflightError(
        f'--environment_config {address}: no worker pool answers (start '
        'one with runners/worker_pool.sh start)')


def check_kafka(opts) -> None:
  """Streaming from Kafka (--bootstrap_servers): a topic to read and a
  broker that accepts connections."""
  if not opts.input_topic:
    raise PreflightError('--bootstrap_servers needs --input_topic (the '
                         'Kafka topic to read)')
  if opts.max_num_records is not None and opts.max_num_records <= 0:
    raise PreflightError(f'--max_num_records must be positive, got '
                         f'{opts.max_num_records}')
  for server in opts.bootstrap_servers.split(','):
    host, _, port = server.strip().rpartition(':')
    if not host or not port.isdigit():
      raise PreflightError(f'--bootstrap_servers {opts.bootstrap_servers}: '
                           f'{server!r} is not host:port')
    if _answers(host.strip('[]'), int(port)):
      return
  raise PreflightError(
      f'--bootstrap_servers {opts.bootstrap_servers}: no Kafka broker '
      'answers (start one with runners/kafka_broker.sh start)')


# --- object stores (network) ---------------------------------------------------
# Flags that may name an s3:// folder or files.
_STORE_PATHS = _ALL_PATHS + ('registry',)


def _s3_client(options: PipelineOptions, timeout: float):
  """A boto3 S3 client set up as Beam's S3 file system sets its own (Beam's
  S3Options: --s3_endpoint_url, --s3_region_name, keys; boto3 reads the
  standard AWS variables for what they leave out, AWS_ENDPOINT_URL among
  them), with a short timeout and no retries: Beam's own client retries
  an endpoint that does not answer for minutes."""
  import boto3  # pylint: disable=import-outside-toplevel
  from botocore.config import Config  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import S3Options  # pylint: disable=import-outside-toplevel
  s3 = options.view_as(S3Options)
  return boto3.session.Session().client(
      's3', region_name=s3.s3_region_name, endpoint_url=s3.s3_endpoint_url,
      use_ssl=not s3.s3_disable_ssl, verify=s3.s3_verify,
      aws_access_key_id=s3.s3_access_key_id,
      aws_secret_access_key=s3.s3_secret_access_key,
      aws_session_token=s3.s3_session_token,
      config=Config(connect_timeout=timeout, read_timeout=timeout,
                    retries={'max_attempts': 1}))


def check_object_stores(options: PipelineOptions, trains: bool = False,
                        timeout: float = 5.0) -> None:
  """Every s3:// bucket the flags name answers (one HEAD each), before any
  job starts; and a run that `trains` does not write into s3://, where
  tf.Transform cannot (TensorFlow 2.16 has no s3:// file system)."""
  flags = _flags(options)
  paths = [(f, str(flags[f])) for f in _STORE_PATHS
           if str(flags.get(f) or '').startswith('s3://')]
  if not paths:
    return
  out = str(flags.get('output_dir') or '')
  if out.startswith('s3://') and trains:
    raise PreflightError(
        f'--output_dir {out}: training writes the transform graph through '
        'TensorFlow, which has no s3:// file system; train into a local or '
        'gs:// --output_dir (--registry s3://... takes the model), or score '
        'into s3:// with --model_dir or --registry and --no-train')
  from botocore import exceptions  # pylint: disable=import-outside-toplevel
  client = _s3_client(options, timeout)
  for flag, path in paths:
    bucket = path[len('s3://'):].split('/', 1)[0]
    try:
      client.head_bucket(Bucket=bucket)
    except exceptions.NoCredentialsError:
      raise PreflightError(
          f'--{flag} {path} needs AWS credentials: none found (set '
          'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)'
      ) from None
    except exceptions.ClientError as e:
      code = str(e.response.get('Error', {}).get('Code', ''))
      what = ('does not exist' if code in ('404', 'NoSuchBucket') else
              f'cannot be used: {code or e}')
      raise PreflightError(f'--{flag} {path}: bucket {bucket} {what}'
                           ) from None
    except (exceptions.BotoCoreError, ValueError) as e:
      raise PreflightError(
          f'--{flag} {path}: no S3 endpoint answers ({e}); set '
          'AWS_ENDPOINT_URL or --s3_endpoint_url for an S3-compatible '
          'server') from None
