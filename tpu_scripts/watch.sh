#!/usr/bin/env bash
# Usage: tpu_scripts/watch.sh --name NAME --zone ZONE --accelerator-type TYPE [create.sh's flags]
#            [setup.sh's flags] [--interval SECONDS] [--max-restarts N] [--logs-dir DIR]
#            [--project PROJECT] [--dry-run --simulate-states LIST] -- ARGS...
#
# Keeps one run of `vlm_jax.main ARGS` going on a TPU until it ends, through preemptions. At every
# check it reads the state of the TPU VM (with --queued, of the queued resource) and acts on it:
#   READY (ACTIVE)              asks worker 0 how the run is (worker.sh status): running: waits;
#                               exit=0: copies the logs back (launch.sh --fetch-logs), exits 0;
#                               exit=3 (stopped on SIGTERM) or lost: launches it again;
#                               none: sets up and launches; any other exit: copies the logs, exits 1
#   PREEMPTED or TERMINATED     deletes the TPU (teardown.sh), creates it again (create.sh) and, once
#   (FAILED or SUSPENDED)       it is READY (ACTIVE), runs setup.sh and launch.sh with the same flags:
#                               the run resumes from the latest checkpoint in its gs:// workdir
#   not found                   creates it, as above
#   anything else               waits: CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ...
# Every re-creation and every new launch of a stopped run spends one of --max-restarts; with none
# left it exits 1. Bad flags exit 2 before anything runs, including those meant for the other scripts.
#
#   --name, --zone, --project            as for the other scripts
#   --accelerator-type TYPE              passed to create.sh, as are --runtime-version, --spot,
#                                        --preemptible and --queued (--queued also to teardown.sh)
#   --ref, --repo-url, --wheel, --python passed to setup.sh
#   --interval SECONDS                   the wait between two checks (default 120)
#   --max-restarts N                     re-creations and relaunches allowed (default 10)
#   --logs-dir DIR                       where the logs go at the end (default tpu_logs/NAME)
#   --dry-run                            print the commands, run nothing, never sleep; takes
#   --simulate-states LIST               comma-separated answers, one per check, in place of gcloud's:
#                                        a state, with ":" and what worker 0 says of the run where
#                                        the TPU is ready (running when left out), e.g.
#                                        READY,PREEMPTED,READY,READY:exit=0
#   --help                               this text
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

accelerator_type=''
queued=0
create_flags=()
setup_flags=()
wheel=''
interval=120
max_restarts=10
logs_dir=''
simulate=''
args=()
while [ "$#" -gt 0 ]; do
  if ! common_flag "$@"; then
    case $1 in
      --accelerator-type | --accelerator-type=*)
        flag_value "$@" && accelerator_type=$value && create_flags+=(--accelerator-type="$value")
        ;;
      --runtime-version | --runtime-version=*) flag_value "$@" && create_flags+=(--runtime-version="$value") ;;
      --spot | --preemptible) create_flags+=("$1") && shift_by=1 ;;
      --queued) queued=1 && shift_by=1 ;;
      --ref | --ref=* | --repo-url | --repo-url=* | --python | --python=*)
        flag_value "$@" && setup_flags+=("${1%%=*}=$value")
        ;;
      --wheel | --wheel=*) flag_value "$@" && wheel=$value && setup_flags+=(--wheel="$value") ;;
      --interval | --interval=*) flag_value "$@" && interval=$value ;;
      --max-restarts | --max-restarts=*) flag_value "$@" && max_restarts=$value ;;
      --logs-dir | --logs-dir=*) flag_value "$@" && logs_dir=$value ;;
      --simulate-states | --simulate-states=*) flag_value "$@" && simulate=$value ;;
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
[ -n "$accelerator_type" ] ||
  usage_error "--accelerator-type is required: it is what a preempted TPU is re-created with"
check_pattern --interval "$interval" '^[0-9]+$' "a whole number of seconds"
check_pattern --max-restarts "$max_restarts" '^[0-9]+$' "a whole number"
[ "${#args[@]}" -gt 0 ] || usage_error "nothing to run: put the arguments for vlm_jax.main after --"
check_workdir "" "${args[@]}"
if [ -n "$wheel" ]; then
  check_wheel "$wheel" # setup.sh checks it too, but only when it first runs
fi
simulated=()
if [ "$dry_run" = 1 ]; then
  [ -n "$simulate" ] || usage_error "--dry-run needs --simulate-states: a dry run asks gcloud nothing"
  IFS=, read -r -a simulated <<<"$simulate"
  for token in "${simulated[@]}"; do
    check_pattern --simulate-states "$token" '^[A-Z_]+(:(running|none|lost|exit=[0-9]+))?$' \
      "a state such as READY, with :running, :none, :lost or :exit=N where the TPU is ready"
  done
elif [ -n "$simulate" ]; then
  usage_error "--simulate-states goes with --dry-run only: simulated states must never delete a real TPU"
fi

# The other scripts, called with the flags that are theirs.
location_flags
teardown_flags=(--quiet)
if [ "$queued" = 1 ]; then
  create_flags+=(--queued)
  teardown_flags+=(--queued)
fi
fetch_flags=(--fetch-logs)
if [ -n "$logs_dir" ]; then
  fetch_flags+=(--logs-dir="$logs_dir")
fi
create_tpu() { "$script_dir/create.sh" "${location[@]}" "${create_flags[@]}" "$@"; }
teardown_tpu() { "$script_dir/teardown.sh" "${location[@]}" "${teardown_flags[@]}"; }
setup_tpu() { "$script_dir/setup.sh" "${location[@]}" ${setup_flags[@]+"${setup_flags[@]}"} "$@"; }
launch_run() { "$script_dir/launch.sh" "${location[@]}" "$@" -- "${args[@]}"; }
fetch_logs() { "$script_dir/launch.sh" "${location[@]}" "${fetch_flags[@]}"; }
# Their flags are checked now, not hours later at the first preemption.
create_tpu --dry-run >/dev/null || exit $?
setup_tpu --dry-run >/dev/null || exit $?
launch_run --dry-run >/dev/null || exit $?

if [ "$queued" = 1 ]; then
  gcloud_tpu queued-resources describe "$name" --format='value(state.state)'
else
  gcloud_tpu tpu-vm describe "$name" --format='value(state)'
fi
describe_command=("${gcloud_command[@]}")
gcloud_tpu tpu-vm ssh "$name" --worker=0 --command="$remote_worker status"
status_command=("${gcloud_command[@]}")
if [ "$dry_run" = 0 ]; then
  error_file=$(mktemp)
  trap 'rm -f "$error_file"' EXIT
fi

note() {
  printf 'watch: %s\n' "$*" >&2
}

show_command() {
  if [ "$dry_run" = 1 ]; then
    print_command "$@"
  else
    print_command "$@" >&2
  fi
}

# observe: the TPU's state into `state` (MISSING when gcloud does not find it, UNKNOWN when gcloud
# fails otherwise) and, in a dry run, the simulated answer of worker 0 into `simulated_job`.
next_token=0
observe() {
  if [ "$dry_run" = 1 ]; then
    if [ "$next_token" -ge "${#simulated[@]}" ]; then
      note "no simulated states left: stopping"
      exit 0
    fi
    show_command "${describe_command[@]}"
    local token=${simulated[next_token]}
    next_token=$((next_token + 1))
    state=${token%%:*}
    simulated_job=running
    if [[ $token == *:* ]]; then
      simulated_job=${token#*:}
    fi
    return
  fi
  show_command "${describe_command[@]}"
  if state=$("${describe_command[@]}" 2>"$error_file"); then
    state=$(printf '%s\n' "$state" | tail -n 1)
    state=${state:-UNKNOWN}
  elif grep -q NOT_FOUND "$error_file"; then
    state=MISSING
  else
    state=UNKNOWN
    note "gcloud could not describe $name: $(tail -n 1 "$error_file")"
  fi
}

# job_status: what worker 0 says of the run (running, none, lost or exit=N; unknown) into `job`.
job_status() {
  show_command "${status_command[@]}"
  if [ "$dry_run" = 1 ]; then
    job=$simulated_job
    return
  fi
  job=$("${status_command[@]}" 2>"$error_file" | tail -n 1) || job=unknown
  case $job in
    running | none | lost | exit=[0-9]*) ;;
    *)
      job=unknown
      note "worker 0 did not answer: $(tail -n 1 "$error_file")"
      ;;
  esac
}

# spend_restart WHAT HAPPENED WHAT NOW: counts a restart, or exits 1 when none is left.
restarts=0
spend_restart() {
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "$max_restarts" ]; then
    note "$1, and all $max_restarts restarts are spent: giving up"
    exit 1
  fi
  note "$1: $2 (restart $restarts of $max_restarts)"
}

fresh=0 # 1 from a successful create until the run is set up and launched on the new TPU
make_tpu() {
  if create_tpu; then
    fresh=1
  else
    note "creating $name failed; trying again at the next check"
  fi
}

start_run() {
  if setup_tpu && launch_run; then
    fresh=0
  else
    spend_restart "setting up or launching on $name failed" "trying again at the next check"
  fi
}

end_run() {
  local exit_status=${job#exit=}
  note "the run on $name ended with status $exit_status: copying its logs back"
  fetch_logs || note "the logs could not be copied"
  if [ "$exit_status" != 0 ]; then
    note "the run failed (status 1: a bug, 2: a user error; see its logs)"
    exit 1
  fi
  exit 0
}

on_ready() {
  if [ "$fresh" = 1 ]; then
    note "$name is $state: setting it up and launching the run"
    start_run
    return
  fi
  job_status
  case $job in
    running) note "$name is $state; worker 0: running" ;;
    none)
      note "$name is $state and runs nothing: setting it up and launching the run"
      start_run
      ;;
    exit=3 | lost)
      spend_restart "the run on $name stopped ($job)" "launching it again"
      launch_run || note "the launch failed; trying again at the next check"
      ;;
    exit=*) end_run ;;
    *) ;; # job_status said that worker 0 did not answer; ask again at the next check
  esac
}

checks=0
while true; do
  observe
  checks=$((checks + 1))
  case $queued:$state in
    0:READY | 1:ACTIVE) on_ready ;;
    0:PREEMPTED | 0:TERMINATED | 1:FAILED | 1:SUSPENDED)
      spend_restart "$name is $state" "re-creating it"
      teardown_tpu || note "deleting $name failed; creating it anyway"
      make_tpu
      ;;
    *:MISSING)
      if [ "$checks" = 1 ]; then
        note "$name does not exist: creating it"
      else
        spend_restart "$name is gone" "creating it again"
      fi
      make_tpu
      ;;
    *) note "$name is $state: waiting" ;;
  esac
  if [ "$dry_run" = 0 ]; then
    sleep "$interval"
  fi
done
