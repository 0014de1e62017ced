#!/usr/bin/env bash
# Usage: tpu_scripts/create.sh --name NAME --zone ZONE --accelerator-type TYPE [--runtime-version VERSION]
#            [--spot | --preemptible] [--queued] [--project PROJECT] [--dry-run]
#
# Creates a Cloud TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued resource
# (gcloud compute tpus queued-resources create) with the id NAME whose one node is NAME.
#
#   --name NAME               the TPU VM (and queued resource) name
#   --zone ZONE               e.g. us-west4-a (v5e), us-central2-b (v4)
#   --accelerator-type TYPE   e.g. v5litepod-16, v4-32, v5p-8, v6e-8
#   --runtime-version VERSION the TPU software version; by default v2-alpha-tpuv5-lite for v5e,
#                             v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base
#                             for v2, v3 and v4
#   --spot                    a Spot TPU: much cheaper, preempted whenever the capacity is needed
#   --preemptible             a preemptible TPU, the older tier (not for queued resources)
#   --queued                  a queued resource: the request waits until capacity is free; the
#                             command returns once the request is queued (watch.sh waits for it)
#   --project PROJECT         the Google Cloud project; gcloud's configured one by default
#   --dry-run                 print the command, run nothing
#   --help                    this text
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

accelerator_type=''
runtime_version=''
spot=0
preemptible=0
queued=0
while [ "$#" -gt 0 ]; do
  if ! common_flag "$@"; then
    case $1 in
      --accelerator-type | --accelerator-type=*) flag_value "$@" && accelerator_type=$value ;;
      --runtime-version | --runtime-version=*) flag_value "$@" && runtime_version=$value ;;
      --spot) spot=1 && shift_by=1 ;;
      --preemptible) preemptible=1 && shift_by=1 ;;
      --queued) queued=1 && shift_by=1 ;;
      *) usage_error "unknown argument $1" ;;
    esac
  fi
  shift "$shift_by"
done

check_common
[ -n "$accelerator_type" ] || usage_error "--accelerator-type is required"
check_pattern --accelerator-type "$accelerator_type" '^v[0-9][a-z0-9]*-[0-9]+$' \
  "an accelerator type such as v5litepod-16 or v4-32"
if [ "$spot" = 1 ] && [ "$preemptible" = 1 ]; then
  usage_error "--spot and --preemptible exclude each other: pick one"
fi
if [ "$queued" = 1 ] && [ "$preemptible" = 1 ]; then
  usage_error "a queued resource cannot be --preemptible: use --spot with --queued, or drop --queued"
fi
if [ -z "$runtime_version" ]; then
  case $accelerator_type in
    v5litepod-* | v5e-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) runtime_version=tpu-ubuntu2204-base ;;
    *)
      usage_error "there is no default runtime version for --accelerator-type=$accelerator_type: pass --runtime-version"
      ;;
  esac
fi
check_pattern --runtime-version "$runtime_version" '^[a-z0-9][-a-z0-9.]*$' "a TPU runtime version"

tier=()
if [ "$spot" = 1 ]; then
  tier=(--spot)
elif [ "$preemptible" = 1 ]; then
  tier=(--preemptible)
fi
if [ "$queued" = 1 ]; then
  gcloud_tpu queued-resources create "$name" --node-id="$name" --accelerator-type="$accelerator_type" \
    --runtime-version="$runtime_version" ${tier[@]+"${tier[@]}"}
else
  gcloud_tpu tpu-vm create "$name" --accelerator-type="$accelerator_type" --version="$runtime_version" \
    ${tier[@]+"${tier[@]}"}
fi
run "${gcloud_command[@]}"
