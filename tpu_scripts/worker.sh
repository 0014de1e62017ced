#!/usr/bin/env bash
# Usage: worker.sh install --python VERSION (checkout | wheel PATH | git URL REF)
#        worker.sh start COMMAND...
#        worker.sh status
#        worker.sh stop
#
# Runs on each worker of a TPU VM, from the copy in ~/vlm_jax/tpu_scripts that setup.sh unpacks there;
# setup.sh, launch.sh and watch.sh call it over ssh.
#
#   install   (re)creates ~/venv with Python VERSION (uv fetches it when the image has another) and
#             installs vlm_jax with its tpu and gcs extras: from ~/vlm_jax itself (checkout, editable),
#             from a wheel copied to the worker, or as "vlm_jax[tpu,gcs] @ git+URL@REF"
#   start     runs COMMAND in ~/vlm_jax under nohup and returns; its output is appended to
#             ~/vlm_jax_logs/worker_<id>.log, its exit status goes to ~/vlm_jax_logs/DONE
#   status    prints one word: running; exit=N (it ended with status N); lost (it is gone without an
#             exit status: killed, or the VM restarted); none (nothing was started)
#   stop      sends SIGTERM to the run, which saves a checkpoint and exits 3
#
# The worker id comes from TPU_WORKER_ID or the metadata server's agent-worker-number, as in JAX.
set -euo pipefail

logs="$HOME/vlm_jax_logs"
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

fail() {
  printf 'worker.sh: error: %s\n' "$*" >&2
  exit 2
}

worker_id() {
  if [ -n "${TPU_WORKER_ID:-}" ]; then
    printf '%s' "$TPU_WORKER_ID"
    return
  fi
  curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    fail "cannot tell this worker's id: TPU_WORKER_ID is unset and the metadata server did not answer"
}

boot_id() {
  cat /proc/sys/kernel/random/boot_id
}

cmd_install() {
  [ "${1:-}" = --python ] && [ -n "${2:-}" ] || fail "install needs --python VERSION first"
  local python_version=$2 requirement
  shift 2
  case "${1:-}:$#" in
    checkout:1) requirement=(-e "$HOME/vlm_jax[tpu,gcs]") ;;
    wheel:2) requirement=("vlm_jax[tpu,gcs] @ file://$2") ;;
    git:3) requirement=("vlm_jax[tpu,gcs] @ git+$2@$3") ;;
    *) fail "install takes checkout, wheel PATH or git URL REF, got: $*" ;;
  esac
  local uv
  uv=$(command -v uv || printf '%s' "$HOME/.local/bin/uv")
  if [ ! -x "$uv" ]; then
    curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh
  fi
  rm -rf "$HOME/venv"
  "$uv" venv --quiet --python "$python_version" "$HOME/venv"
  "$uv" pip install --quiet --python "$HOME/venv/bin/python" "${requirement[@]}"
  printf 'worker %s: installed %s into ~/venv\n' "$(worker_id)" "${requirement[*]}"
}

cmd_status() {
  if [ -f "$logs/DONE" ]; then
    printf 'exit=%s\n' "$(cat "$logs/DONE")"
  elif [ ! -f "$logs/pid" ]; then
    echo none
  else
    local pid boot
    read -r pid boot <"$logs/pid"
    # A pid from before a restart of the VM may name another process now.
    if [ "$boot" = "$(boot_id)" ] && kill -0 "$pid" 2>/dev/null; then
      echo running
    else
      echo lost
    fi
  fi
}

cmd_start() {
  [ "$#" -gt 0 ] || fail "start needs a command"
  mkdir -p "$logs"
  if [ "$(cmd_status)" = running ]; then
    fail "a run is going already (pid $(cut -d' ' -f1 "$logs/pid")); end it first with: worker.sh stop"
  fi
  local id log
  id=$(worker_id)
  log="$logs/worker_$id.log"
  rm -f "$logs/pid" "$logs/DONE"
  printf '=== %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$log"
  cd "$HOME/vlm_jax"
  nohup bash "$self" _run "$log" "$@" </dev/null >/dev/null 2>&1 &
  local waited=0
  until [ -f "$logs/pid" ] || [ -f "$logs/DONE" ]; do
    [ "$waited" -lt 100 ] || fail "the run did not start within 10 s; see $log"
    sleep 0.1
    waited=$((waited + 1))
  done
  printf 'worker %s: started, log %s\n' "$id" "$log"
}

# _run LOG COMMAND...: the background half of start.
cmd__run() {
  local log=$1
  shift
  "$@" >>"$log" 2>&1 &
  local child=$! exit_status=0
  printf '%s %s\n' "$child" "$(boot_id)" >"$logs/pid"
  wait "$child" || exit_status=$?
  printf '%s\n' "$exit_status" >"$logs/DONE"
}

cmd_stop() {
  if [ "$(cmd_status)" != running ]; then
    echo "no run is going"
    return
  fi
  local pid
  pid=$(cut -d' ' -f1 "$logs/pid")
  kill -TERM "$pid"
  printf 'worker %s: sent SIGTERM to pid %s\n' "$(worker_id)" "$pid"
}

case "${1:-}" in
  install | start | status | stop | _run)
    subcommand=cmd_$1
    shift
    "$subcommand" "$@"
    ;;
  -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ;;
  *) fail "expected install, start, status or stop, got '${1:-}'" ;;
esac
