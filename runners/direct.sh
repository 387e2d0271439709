#!/usr/bin/env bash
# pipelines.batch on the DirectRunner (this machine). Flags pass through:
#
#   runners/direct.sh --input 'data/in/*.jsonl' --output_dir /tmp/out
#   runners/direct.sh --direct_num_workers 4 --direct_running_mode multi_processing
#
# PYTHON picks the interpreter (default: python3 on PATH, e.g. an active venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

exec "${PYTHON:-python3}" -m pipelines.batch --runner DirectRunner "$@"
