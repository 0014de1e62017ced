# shellcheck shell=bash disable=SC2034
# (SC2034, assigned but unused: this file sets variables for the scripts that source it to read.)
# Sourced by the tpu_scripts/*.sh that run on the local machine: flag parsing, validation and `run`,
# which prints every command before it runs it and, under --dry-run, only prints it.
#
# A printed command is one line: "+ " and then the words as a person would type them, the way bash's
# `set -x` shows them. A word of safe characters stays as it is; any other goes in single quotes (in
# double quotes when it holds a single quote and nothing that double quotes would expand); the
# `--flag=` part of an option stays outside the quotes; a word with a control character (a newline)
# is written $'...'. The text after "+ " pasted into bash runs the same command. Under --dry-run the
# lines go to stdout and nothing runs; otherwise they go to stderr.

script_name=$(basename "$0")
# Relative when the script was called by a relative path, so that a dry run from the repository root
# prints the same paths on every machine.
script_dir=$(dirname "$0")
repo_root=$(dirname "$script_dir")
# What runs on the workers: the copy of tpu_scripts/worker.sh that setup.sh unpacks into ~/vlm_jax.
remote_worker='bash ~/vlm_jax/tpu_scripts/worker.sh'

name=''
zone=''
project=''
dry_run=0

# The script's header comment, from its second line to the first line that is not a comment.
usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
}

# usage_error MESSAGE: one line on stderr, exit status 2.
usage_error() {
  printf '%s: error: %s\n' "$script_name" "$*" >&2
  exit 2
}

# flag_value "$@": the value of the option in $1, given as `--flag=VALUE` or `--flag VALUE`, into
# `value`; `shift_by` is the number of words it took.
flag_value() {
  if [[ $1 == *=* ]]; then
    value=${1#*=}
    shift_by=1
  elif [ "$#" -ge 2 ]; then
    value=$2
    shift_by=2
  else
    usage_error "$1 needs a value"
  fi
}

# common_flag "$@": takes the flags that every script has (--name, --zone, --project, --dry-run,
# --help) and sets `shift_by`; returns 1 for any other word.
common_flag() {
  case $1 in
    --name | --name=*) flag_value "$@" && name=$value ;;
    --zone | --zone=*) flag_value "$@" && zone=$value ;;
    --project | --project=*) flag_value "$@" && project=$value ;;
    --dry-run) dry_run=1 && shift_by=1 ;;
    -h | --help) usage && exit 0 ;;
    *) return 1 ;;
  esac
}

# check_pattern FLAG VALUE REGEX WHAT: a usage error unless VALUE matches REGEX.
check_pattern() {
  [[ $2 =~ $3 ]] || usage_error "$1=$2 is not $4"
}

# check_common: --name and --zone given and well formed, --project well formed when given.
check_common() {
  [ -n "$name" ] || usage_error "--name is required"
  [ -n "$zone" ] || usage_error "--zone is required"
  check_pattern --name "$name" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "a TPU name (lower-case letters, digits and hyphens, starting with a letter)"
  check_pattern --zone "$zone" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "a zone such as us-west4-a"
  if [ -n "$project" ]; then
    check_pattern --project "$project" '^[a-z][-a-z0-9.:]*[a-z0-9]$' "a Google Cloud project id"
  fi
}

# gcloud_tpu KIND VERB ARGS...: the gcloud command for a TPU VM (KIND tpu-vm) or a queued resource
# (KIND queued-resources), --zone after the positional ARGS and --project last when one was given,
# into `gcloud_command`.
gcloud_tpu() {
  gcloud_command=(gcloud compute tpus "$1" "$2")
  shift 2
  while [ "$#" -gt 0 ] && [[ $1 != --* ]]; do
    gcloud_command+=("$1")
    shift
  done
  gcloud_command+=(--zone="$zone" "$@")
  if [ -n "$project" ]; then
    gcloud_command+=(--project="$project")
  fi
}

# location_flags: --name and --zone, with --project and --dry-run where given, into `location`: how
# one of the scripts calls another for the same TPU.
location_flags() {
  location=(--name="$name" --zone="$zone")
  if [ -n "$project" ]; then
    location+=(--project="$project")
  fi
  if [ "$dry_run" = 1 ]; then
    location+=(--dry-run)
  fi
}

# check_wheel PATH: the wheel must exist, except in a dry run, which reads no file.
check_wheel() {
  if [ "$dry_run" = 0 ] && [ ! -f "$1" ]; then
    usage_error "--wheel=$1 does not exist: build it first (pip wheel --no-deps -w dist .)"
  fi
}

# check_workdir HINT ARGS...: the --workdir among vlm_jax.main's arguments must be a gs:// path; HINT
# ends the error message.
check_workdir() {
  local hint=$1 argument previous='' workdir=''
  shift
  for argument in "$@"; do
    case $argument in
      --workdir=*) workdir=${argument#--workdir=} ;;
    esac
    if [ "$previous" = --workdir ]; then
      workdir=$argument
    fi
    previous=$argument
  done
  local why="every worker must write the same checkpoints, and a re-created VM resumes from them"
  [ -n "$workdir" ] || usage_error "the run needs --workdir=gs://BUCKET/PATH among its arguments: $why$hint"
  [[ $workdir == gs://?* ]] || usage_error "--workdir=$workdir is not a gs:// path: $why$hint"
}

# quote_word WORD: WORD as a person would type it for bash (see the top of this file).
quote_word() {
  local word=$1 prefix=''
  if [[ $word =~ ^(--[A-Za-z0-9][A-Za-z0-9._-]*=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  elif [[ $word == *[[:cntrl:]]* ]]; then
    printf '%s%q' "$prefix" "$word" # $'...', so that a newline in a word keeps the command on one line
  elif [[ $word != *\'* ]]; then
    printf "%s'%s'" "$prefix" "$word"
  elif [[ $word != *[\$\`\"\\!]* ]]; then
    printf '%s"%s"' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

# quote_words WORDS...: the words quoted and joined by spaces, one shell command line.
quote_words() {
  local word line=''
  for word in "$@"; do
    line+="${line:+ }$(quote_word "$word")"
  done
  printf '%s' "$line"
}

# print_command WORDS...: the "+ " line for a command, on stdout.
print_command() {
  printf '+ %s\n' "$(quote_words "$@")"
}

# run WORDS...: prints the command (stdout under --dry-run, else stderr) and runs it unless --dry-run.
run() {
  if [ "$dry_run" = 1 ]; then
    print_command "$@"
    return 0
  fi
  print_command "$@" >&2
  "$@"
}
