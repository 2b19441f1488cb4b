#!/usr/bin/env bash
# Submit the sample manifest to the cluster at RAY_ADDRESS (default: a local head on 8265).
set -euo pipefail
cd "$(dirname "$0")/.."
ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
  python -m jobs.score --manifest samples/agiqa3k/manifest.jsonl --image-root samples/agiqa3k \
  --output "${OUTPUT:-/tmp/ma-agiqa-sample-scores}" --model tiny-random --allow-untrained --keep-columns prompt,generator
