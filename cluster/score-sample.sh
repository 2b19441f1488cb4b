#!/usr/bin/env bash
# Submit the sample manifest to the cluster at RAY_ADDRESS (default: a local head on 8265).
set -euo pipefail
cd "$(dirname "$0")/.."
# A local run (python -m jobs.score without --address) writes ~/.ray/auth_token, and a `ray start --head` on
# the same machine afterwards then requires that token: without RAY_AUTH_MODE=token, `ray job submit` gets
# HTTP 401 "Missing authentication token". Send the token when there is one, unless RAY_AUTH_MODE is set.
if [[ -z "${RAY_AUTH_MODE:-}" && -f "$HOME/.ray/auth_token" ]]; then
  export RAY_AUTH_MODE=token
fi
# The output must be an absolute path or an object store URI: a relative one would land in the temporary
# copy of the working directory Ray makes for the job (the job refuses it, exit 2).
ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
  python -m jobs.score --manifest samples/agiqa3k/manifest.jsonl --image-root samples/agiqa3k \
  --output "${OUTPUT:-/tmp/ma-agiqa-sample-scores}" --model tiny-random --allow-untrained --keep-columns prompt,generator
