#!/usr/bin/env bash
# pipelines.batch on Apache Flink through Beam's Flink job server.
#
#   FLINK_MASTER   host:port of the JobManager's REST endpoint
#                  (default localhost:8081; "[local]" = an embedded Flink)
#   ENVIRONMENT_TYPE  where the Python workers run. Default EXTERNAL: the
#                  worker pool of runners/worker_pool.sh on this machine,
#                  one process per worker, so parallelism 2 uses two cores.
#                  LOOPBACK: every Python stage in this process (one core).
#                  DOCKER / PROCESS / EXTERNAL for a real cluster, which then
#                  needs gs:// paths and this project's code on the workers
#                  (--setup_file ./setup.py or an SDK image with it).
#   ENVIRONMENT_CONFIG  --environment_config (image, process command or
#                  worker pool address); EXTERNAL's default is
#                  127.0.0.1:$WORKER_POOL_PORT (default 50000)
#   SDK_WORKER_PARALLELISM  Python worker processes per TaskManager for
#                  EXTERNAL (default: PARALLELISM)
#   PARALLELISM    --parallelism (default 2)
#   FLINK_VERSION  --flink_version (1.17-1.20, default: Beam's newest)
#   FLINK_JOB_SERVER_JAR  the job server jar (default: the launcher that
#                  runners/fetch_jars.sh builds, runners/.jars/
#                  beam-flink-job-server.jar)
#   JOB_ENDPOINT   a running Beam Flink job server (host:8099) instead
#
#   runners/worker_pool.sh start; runners/flink_cluster.sh start   # once
#   runners/flink.sh --input 'data/in/*.jsonl' --output_dir /tmp/out
#   FLINK_MASTER=flink:8081 ENVIRONMENT_TYPE=DOCKER runners/flink.sh \
#       --input 'gs://b/in/*.jsonl' --output_dir gs://b/out \
#       --setup_file ./setup.py
#
# Flags after these pass through to pipelines.batch and override them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

env_type="${ENVIRONMENT_TYPE:-EXTERNAL}"
args=(--runner FlinkRunner
      --flink_master "${FLINK_MASTER:-localhost:8081}"
      --environment_type "$env_type"
      --parallelism "${PARALLELISM:-2}")
env_config="${ENVIRONMENT_CONFIG:-}"
if [[ -z "$env_config" && "${env_type^^}" == EXTERNAL ]]; then
  env_config="127.0.0.1:${WORKER_POOL_PORT:-50000}"
fi
if [[ -n "$env_config" ]]; then
  args+=(--environment_config "$env_config")
fi
if [[ "${env_type^^}" == EXTERNAL ]]; then
  args+=(--sdk_worker_parallelism "${SDK_WORKER_PARALLELISM:-${PARALLELISM:-2}}")
fi
if [[ -n "${FLINK_VERSION:-}" ]]; then
  args+=(--flink_version "$FLINK_VERSION")
fi
# The launcher runners/fetch_jars.sh builds, unless another jar or a running
# job server is given (nothing is downloaded at run time).
jar="${FLINK_JOB_SERVER_JAR:-}"
if [[ -z "$jar" && -z "${JOB_ENDPOINT:-}" ]]; then
  jar="$ROOT/runners/.jars/beam-flink-job-server.jar"
fi
if [[ -n "$jar" ]]; then
  args+=(--flink_job_server_jar "$jar")
fi
if [[ -n "${JOB_ENDPOINT:-}" ]]; then
  args+=(--job_endpoint "$JOB_ENDPOINT")
fi

exec "${PYTHON:-python3}" -m pipelines.batch "${args[@]}" "$@"
