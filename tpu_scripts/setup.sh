#!/usr/bin/env bash
# Usage: tpu_scripts/setup.sh --name NAME --zone ZONE [--ref REF [--repo-url URL] | --wheel PATH]
#            [--python VERSION] [--project PROJECT] [--dry-run]
#
# Installs vlm_jax with its tpu and gcs extras (gs:// workdirs need gcsfs) into ~/venv on every worker
# of the TPU VM NAME, replacing what an earlier setup left there. The code comes from
#   the local checkout (default)  packed with tar, copied with scp, installed editable in ~/vlm_jax;
#   --ref REF                     pip's "vlm_jax[tpu,gcs] @ git+URL@REF", URL from --repo-url;
#   --wheel PATH                  a built wheel, copied with scp, "vlm_jax[tpu,gcs] @ file://PATH".
# With --ref and --wheel the package has no experiments/, so this checkout's experiments/ goes to
# ~/vlm_jax on the workers and `--config=experiments/...` works the same in every case. So does
# tpu_scripts/worker.sh, which does the install on each worker (see its header).
#
#   --name NAME         the TPU VM name
#   --zone ZONE         its zone
#   --ref REF           a git branch, tag or commit to install
#   --repo-url URL      the git repository for --ref (default https://github.com/vlm-jax/vlm_jax)
#   --wheel PATH        a wheel to install, e.g. dist/vlm_jax-0.1.0-py3-none-any.whl
#   --python VERSION    the Python of ~/venv (default 3.12; uv fetches it when the image has another)
#   --project PROJECT   the Google Cloud project; gcloud's configured one by default
#   --dry-run           print the commands, run nothing (and check no file)
#   --help              this text
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

ref=''
repo_url=''
wheel=''
python_version=3.12
while [ "$#" -gt 0 ]; do
  if ! common_flag "$@"; then
    case $1 in
      --ref | --ref=*) flag_value "$@" && ref=$value ;;
      --repo-url | --repo-url=*) flag_value "$@" && repo_url=$value ;;
      --wheel | --wheel=*) flag_value "$@" && wheel=$value ;;
      --python | --python=*) flag_value "$@" && python_version=$value ;;
      *) usage_error "unknown argument $1" ;;
    esac
  fi
  shift "$shift_by"
done

check_common
check_pattern --python "$python_version" '^3\.[0-9]+$' "a Python version such as 3.12"
if [ -n "$ref" ] && [ -n "$wheel" ]; then
  usage_error "--ref and --wheel exclude each other: install from git or from a wheel"
fi
if [ -n "$repo_url" ] && [ -z "$ref" ]; then
  usage_error "--repo-url needs --ref: name the branch, tag or commit to install"
fi
# What goes to ~/vlm_jax on the workers: the whole checkout (.), or what the package lacks.
bundle_contents=(.)
if [ -n "$ref" ]; then
  repo_url=${repo_url:-https://github.com/vlm-jax/vlm_jax}
  check_pattern --ref "$ref" '^[A-Za-z0-9_][A-Za-z0-9_./-]*$' "a git branch, tag or commit"
  check_pattern --repo-url "$repo_url" '^[a-z][a-z0-9+.-]*://[A-Za-z0-9_.~:/@%+-]+$' "a git repository URL"
  install_from=(git "$repo_url" "$ref")
  bundle_contents=(experiments tpu_scripts/worker.sh)
elif [ -n "$wheel" ]; then
  [[ $(basename "$wheel") =~ ^[A-Za-z0-9_.+-]+\.whl$ ]] ||
    usage_error "--wheel=$wheel is not a wheel, whose file name ends in .whl"
  check_wheel "$wheel"
  install_from=(wheel "/tmp/$(basename "$wheel")")
  bundle_contents=(experiments tpu_scripts/worker.sh)
else
  install_from=(checkout)
fi

bundle="${TMPDIR:-/tmp}"
bundle="${bundle%/}/vlm_jax_$name.tgz"
remote_bundle="/tmp/$(basename "$bundle")"
if [ "${bundle_contents[0]}" = . ]; then
  run tar -C "$repo_root" --exclude=.git --exclude=.venv --exclude=.ci-venv --exclude=workdirs \
    --exclude=tpu_logs --exclude=__pycache__ -czf "$bundle" .
else
  run tar -C "$repo_root" -czf "$bundle" "${bundle_contents[@]}"
fi
if [ -n "$wheel" ]; then
  gcloud_tpu tpu-vm scp "$wheel" "$bundle" "$name:/tmp/" --worker=all
else
  gcloud_tpu tpu-vm scp "$bundle" "$name:/tmp/" --worker=all
fi
run "${gcloud_command[@]}"
remote="rm -rf ~/vlm_jax && mkdir -p ~/vlm_jax && tar -C ~/vlm_jax -xzf $(quote_word "$remote_bundle")"
remote+=" && $remote_worker install --python $python_version $(quote_words "${install_from[@]}")"
gcloud_tpu tpu-vm ssh "$name" --worker=all --command="$remote"
run "${gcloud_command[@]}"
