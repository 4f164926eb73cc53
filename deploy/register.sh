#!/usr/bin/env bash
# Registers DiffColor Archive with a Prefect server: the `diffcolor` work pool
# (process type), its queues, and the deployments of deploy/prefect.yaml.
# Safe to run again: existing pools and queues are kept; deployments are
# updated in place (their run history stays).
#
# Used by deploy/local/start.sh, the compose `init` service and the
# Kubernetes `diffcolor-register` Job. Needs `prefect` on PATH, PREFECT_API_URL,
# and the nightly run's DIFFCOLOR_MANIFEST, DIFFCOLOR_OUTPUT, DIFFCOLOR_MODEL
# and DIFFCOLOR_PRESET (see deploy/.env.example).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${DIFFCOLOR_PRESET:=default}"
export DIFFCOLOR_PRESET
for required in PREFECT_API_URL DIFFCOLOR_MANIFEST DIFFCOLOR_OUTPUT DIFFCOLOR_MODEL; do
  if [ -z "${!required:-}" ]; then
    echo "register.sh: $required is not set (see deploy/.env.example)" >&2
    exit 2
  fi
done

create_once() {  # runs a `prefect ... create` command; "already exists" counts as done
  local out
  if ! out="$("$@" 2>&1)"; then
    grep -qi "already exists" <<<"$out" || { echo "$out" >&2; return 1; }
  fi
}

# 1. The pool, and its queues: reprocess first, since a curator is waiting on it.
create_once prefect work-pool create diffcolor --type process
create_once prefect work-queue create reprocess --pool diffcolor --priority 1
create_once prefect work-queue create nightly --pool diffcolor --priority 2

# 2. The deployments. Entrypoints are relative to the project root. The pull
#    step's {{ $DIFFCOLOR_PROJECT_DIR }} must stay a placeholder, for each
#    worker to fill with its own folder when a run starts: Prefect would fill
#    it now from this environment, so it is left out here.
echo "registering deploy/prefect.yaml: manifest $DIFFCOLOR_MANIFEST, output $DIFFCOLOR_OUTPUT," \
     "model $DIFFCOLOR_MODEL, preset $DIFFCOLOR_PRESET"
cd "$ROOT"
env -u DIFFCOLOR_PROJECT_DIR PREFECT_CLI_PROMPT=false prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml
