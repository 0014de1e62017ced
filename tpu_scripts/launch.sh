#!/usr/bin/env bash
# Usage: tpu_scripts/launch.sh --name NAME --zone ZONE [--project PROJECT] [--setup]
#            [--allow-local-workdir] [--dry-run] -- ARGS...
#        tpu_scripts/launch.sh --name NAME --zone ZONE [--project PROJECT] --fetch-logs [--logs-dir DIR]
#            [--dry-run]
#
# Starts `python -m vlm_jax.main ARGS --config.distributed.mode=always` on every worker of the TPU VM
# NAME at once, in the background (nohup), from ~/vlm_jax with ~/venv (see setup.sh), and returns.
# With --setup it first runs setup.sh, which installs the local checkout on every worker.
# With mode=always every worker joins one JAX job (jax.distributed.initialize). Each worker appends
# its output to ~/vlm_jax_logs/worker_<id>.log and writes the exit status to ~/vlm_jax_logs/DONE
# (tpu_scripts/worker.sh does that). ARGS must hold --workdir=gs://...: every worker writes there, and
# the same command resumes from its latest checkpoint, also on a re-created VM (watch.sh).
#
#   --name NAME             the TPU VM name
#   --zone ZONE             its zone
#   --setup                 run setup.sh first (the local checkout; setup.sh itself for the others)
#   --allow-local-workdir   accept a --workdir that is not on gs://
#   --fetch-logs            launch nothing: copy every worker's log to DIR
#   --logs-dir DIR          where --fetch-logs puts the logs (default tpu_logs/NAME)
#   --project PROJECT       the Google Cloud project; gcloud's configured one by default
#   --dry-run               print the commands, run nothing
#   --help                  this text
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

allow_local_workdir=0
setup=0
fetch_logs=0
logs_dir=''
args=()
while [ "$#" -gt 0 ]; do
  if ! common_flag "$@"; then
    case $1 in
      --setup) setup=1 && shift_by=1 ;;
      --allow-local-workdir) allow_local_workdir=1 && shift_by=1 ;;
      --fetch-logs) fetch_logs=1 && shift_by=1 ;;
      --logs-dir | --logs-dir=*) flag_value "$@" && logs_dir=$value ;;
      --)
        shift
        args=("$@")
        break
        ;;
      *) usage_error "unknown argument $1 (the arguments for vlm_jax.main go after --)" ;;
    esac
  fi
  shift "$shift_by"
done
check_common

if [ "$fetch_logs" = 1 ]; then
  [ "$setup" = 0 ] || usage_error "--setup goes with a launch, not with --fetch-logs"
  [ "${#args[@]}" = 0 ] || usage_error "--fetch-logs launches nothing: give it no arguments after --"
  logs_dir=${logs_dir:-tpu_logs/$name}
  run mkdir -p "$logs_dir"
  gcloud_tpu tpu-vm scp "$name:~/vlm_jax_logs/worker_*.log" "${logs_dir%/}/" --worker=all
  run "${gcloud_command[@]}"
  exit 0
fi
[ -z "$logs_dir" ] || usage_error "--logs-dir goes with --fetch-logs"
[ "${#args[@]}" -gt 0 ] || usage_error "nothing to launch: put the arguments for vlm_jax.main after --"
if [ "$allow_local_workdir" = 0 ]; then
  check_workdir " (--allow-local-workdir to run anyway)" "${args[@]}"
fi

if [ "$setup" = 1 ]; then
  location_flags
  "$script_dir/setup.sh" "${location[@]}"
fi
remote="$remote_worker start ~/venv/bin/python -m vlm_jax.main $(quote_words "${args[@]}")"
remote+=" --config.distributed.mode=always"
gcloud_tpu tpu-vm ssh "$name" --worker=all --command="$remote"
run "${gcloud_command[@]}"
