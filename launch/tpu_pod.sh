#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: creates it (a queued resource) or reuses it, copies this
# checkout to every worker, runs launch/setup.sh there, then the same launch/run.py on all workers
# at once (jax finds its peers through the TPU metadata server: no cluster flags), and copies each
# worker's log back.
#
#   TPU=flaxhf-v4 ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu_pod.sh \
#       --config configs/text_classification.py:sst2 --workdir /mnt/shared/runs/sst2
#
# Run it first with --dry_run appended: each worker prints the cluster, devices and mesh it sees.
# The workdir must be storage every worker sees at the same path (a Filestore/NFS or gcsfuse
# mount): each process writes its own shards of every checkpoint there.
# Settings (environment): TPU and ZONE (required); ACCELERATOR and VERSION (only to create);
# PROJECT; SPOT=1 for a spot queued resource; REMOTE_DIR (default flaxhf, under each worker's
# home); LOGS (default tpu_logs/$TPU). Exit status: the workers' highest; 75 means preempted with
# a checkpoint saved, so rerunning this script resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE, e.g. us-central2-b}"
VERSION=${VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-flaxhf}
LOGS=${LOGS:-tpu_logs/$TPU}
GCLOUD=(gcloud compute tpus)
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

if ! "${GCLOUD[@]}" tpu-vm describe "$TPU" "${WHERE[@]}" >/dev/null 2>&1; then
  : "${ACCELERATOR:?no TPU named $TPU: set ACCELERATOR (e.g. v4-32) to create it}"
  echo "Creating $TPU ($ACCELERATOR) as a queued resource ..."
  "${GCLOUD[@]}" queued-resources create "$TPU" --node-id="$TPU" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" ${SPOT:+--spot}
  while true; do
    state=$("${GCLOUD[@]}" queued-resources describe "$TPU" "${WHERE[@]}" \
            --format='value(state.state)')
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) echo "Queued resource $TPU is $state." >&2; exit 1 ;;
      *) echo "  $state ..."; sleep 30 ;;
    esac
  done
fi

ssh_all() { "${GCLOUD[@]}" tpu-vm ssh "$TPU" "${WHERE[@]}" --worker=all --command="$1"; }

# The checkout as it is (tracked and new files, uncommitted edits included), the same on every worker.
archive=$(mktemp /tmp/flaxhf.XXXXXX.tgz)
git ls-files -z --cached --others --exclude-standard | tar czf "$archive" --null -T -
"${GCLOUD[@]}" tpu-vm scp "$archive" "$TPU:flaxhf.tgz" "${WHERE[@]}" --worker=all
rm -f "$archive"
ssh_all "mkdir -p $REMOTE_DIR && tar xzf flaxhf.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && \
  bash launch/setup.sh && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"

# Every worker runs the same command; its log and exit status stay on the worker until copied.
args=$(printf '%q ' "$@")
set +e
ssh_all "cd $REMOTE_DIR && mkdir -p run_logs && \
  .venv/bin/python launch/run.py $args > run_logs/\$(hostname).log 2>&1; \
  echo \$? > run_logs/\$(hostname).status"
set -e
mkdir -p "$LOGS"
"${GCLOUD[@]}" tpu-vm scp "$TPU:$REMOTE_DIR/run_logs/*" "$LOGS/" "${WHERE[@]}" --worker=all
status=$(cat "$LOGS"/*.status | sort -n | tail -1)
echo "Logs in $LOGS/ (one per worker); exit status $status."
[ "$status" = 75 ] && echo "Preempted with a checkpoint saved: rerun this script to resume."
exit "$status"
