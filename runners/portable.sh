#!/usr/bin/env bash
# pipelines.batch on the PortableRunner: a Beam job service (JOB_ENDPOINT,
# default "embed": an in-process job service) with Python workers given by
# ENVIRONMENT_TYPE (default LOOPBACK: workers in this process, so local paths
# work). Flags pass through and override these defaults:
#
#   runners/portable.sh --input 'data/in/*.jsonl' --output_dir /tmp/out
#   JOB_ENDPOINT=localhost:8099 runners/portable.sh --input gs://b/in/*.jsonl ...
#
# ENVIRONMENT_CONFIG is passed as --environment_config when set (a container
# image for DOCKER, a worker pool address for EXTERNAL).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

args=(--runner PortableRunner
      --job_endpoint "${JOB_ENDPOINT:-embed}"
      --environment_type "${ENVIRONMENT_TYPE:-LOOPBACK}")
if [[ -n "${ENVIRONMENT_CONFIG:-}" ]]; then
  args+=(--environment_config "$ENVIRONMENT_CONFIG")
fi

exec "${PYTHON:-python3}" -m pipelines.batch "${args[@]}" "$@"
