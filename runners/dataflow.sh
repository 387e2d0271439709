#!/usr/bin/env bash
# pipelines.batch on Google Cloud Dataflow.
#
#   PROJECT        Google Cloud project id (--project)
#   REGION         Dataflow region (--region, default us-central1)
#   BUCKET         a bucket for Dataflow's files: --temp_location
#                  gs://$BUCKET/tmp and --staging_location gs://$BUCKET/staging
#                  (or set TEMP_LOCATION / STAGING_LOCATION yourself)
#   SDK_CONTAINER_IMAGE  an SDK image with this project installed (e.g. the
#                  Flex Template image, runners/flex_template/Dockerfile);
#                  without it the workers install the project from
#                  --setup_file setup.py when they start
#
#   PROJECT=my-project BUCKET=my-bucket runners/dataflow.sh \
#       --input 'gs://my-bucket/in/*.jsonl' --output_dir gs://my-bucket/out
#
# Inputs and outputs must be gs:// paths (the workers are Google Cloud VMs).
# Flags after these pass through to pipelines.batch and override them, e.g.
# --max_num_workers 10 --machine_type n2-standard-4 --dry_run=True.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

TEMP_LOCATION="${TEMP_LOCATION:-${BUCKET:+gs://$BUCKET/tmp}}"
STAGING_LOCATION="${STAGING_LOCATION:-${BUCKET:+gs://$BUCKET/staging}}"

args=(--runner DataflowRunner --region "${REGION:-us-central1}")
if [[ -n "${PROJECT:-}" ]]; then
  args+=(--project "$PROJECT")
fi
if [[ -n "$TEMP_LOCATION" ]]; then
  args+=(--temp_location "$TEMP_LOCATION")
fi
if [[ -n "$STAGING_LOCATION" ]]; then
  args+=(--staging_location "$STAGING_LOCATION")
fi
if [[ -n "${SDK_CONTAINER_IMAGE:-}" ]]; then
  args+=(--sdk_container_image "$SDK_CONTAINER_IMAGE")
else
  args+=(--setup_file "$ROOT/setup.py")
fi

exec "${PYTHON:-python3}" -m pipelines.batch "${args[@]}" "$@"
