#!/usr/bin/env bash
# Usage: tpu_scripts/teardown.sh --name NAME --zone ZONE [--queued] [--quiet] [--async]
#            [--project PROJECT] [--dry-run]
#
# Deletes the TPU VM NAME (gcloud compute tpus tpu-vm delete) or, with --queued, the queued resource
# NAME together with its node (gcloud compute tpus queued-resources delete --force). The workdir on
# gs:// is not touched.
#
#   --name NAME         the TPU VM (and queued resource) name
#   --zone ZONE         its zone
#   --queued            it was made with create.sh --queued
#   --quiet             no confirmation prompt (gcloud --quiet)
#   --async             return at once instead of waiting for the deletion (gcloud --async)
#   --project PROJECT   the Google Cloud project; gcloud's configured one by default
#   --dry-run           print the command, run nothing
#   --help              this text
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

queued=0
options=()
while [ "$#" -gt 0 ]; do
  if ! common_flag "$@"; then
    case $1 in
      --queued) queued=1 && shift_by=1 ;;
      --quiet | --async) options+=("$1") && shift_by=1 ;;
      *) usage_error "unknown argument $1" ;;
    esac
  fi
  shift "$shift_by"
done
check_common

if [ "$queued" = 1 ]; then
  # --force: a queued resource that still has its node cannot be deleted without it.
  gcloud_tpu queued-resources delete "$name" --force ${options[@]+"${options[@]}"}
else
  gcloud_tpu tpu-vm delete "$name" ${options[@]+"${options[@]}"}
fi
run "${gcloud_command[@]}"
