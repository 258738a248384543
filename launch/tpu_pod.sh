#!/usr/bin/env bash
# Runs instaflow_jax.main on every worker of a Cloud TPU VM slice: all workers run the same
# command, and --distributed lets JAX find the others (jax.distributed auto-detection).
#
#   launch/tpu_pod.sh TPU_NAME ZONE setup          # once: copy this checkout, install
#   launch/tpu_pod.sh TPU_NAME ZONE run --config=configs/sd15_rf.py:/data/sd15 \
#       --workdir=gs://BUCKET/sd15_rf --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
#       --config.mesh.fsdp=8
#
# The workdir and data_dir must be visible to every worker (a GCS bucket): each process
# writes its slices of the checkpoints, and process 0 the metrics and sample grids.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE setup|run [instaflow_jax.main flags...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 ACTION=$3
shift 3
DIR=instaflow_jax
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}
case "$ACTION" in
  setup)
    cd "$(dirname "$0")/.."
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
        instaflow_jax configs launch setup.py README.md "$TPU_NAME:~/$DIR"
    # install.sh installs the CPU jaxlib; the TPU one replaces it.
    on_all_workers "cd ~/$DIR && bash launch/install.sh && .venv/bin/python -m pip install -q 'jax[tpu]'"
    ;;
  run)
    on_all_workers "cd ~/$DIR && .venv/bin/python -m instaflow_jax.main --distributed $(printf '%q ' "$@")"
    ;;
  *)
    echo "unknown action $ACTION: use setup or run" >&2
    exit 2
    ;;
esac
