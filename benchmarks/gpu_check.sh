#!/usr/bin/env bash
# One GPU check (under 8 minutes on one H100/H200): bf16 ViT-B/16 train-step MFU with and without remat,
# encode throughput against PyTorch bf16 and torch.compile, exact search over a 10M x 512 bf16 memory;
# everything lands in one JSON (benchmarks/gpu_check.py says what each number is).
#
#   benchmarks/gpu_check.sh --out /tmp/gpu_check.json [--wheels DIR] [-- gpu_check.py options]
#   benchmarks/gpu_check.sh --dry --out /tmp/gpu_check_dry.json    # tiny shapes on the CPU, no install
#
# When JAX has no GPU backend, the `cuda` extra of pyproject.toml is installed first, pinned to the JAX
# already there (from the wheels in --wheels DIR when given, else from the package registry); a
# checkout that is not installed at all is installed with the extra. PYTHON picks the interpreter.
set -euo pipefail

usage() {
  echo "usage: $0 --out FILE [--dry] [--wheels DIR] [-- extra gpu_check.py options]" >&2
  exit 2
}

out=""
wheels=""
dry=0
extra=()
while (($#)); do
  case "$1" in
    --out | --wheels)
      (($# >= 2)) || { echo "$1 needs a value" >&2; usage; }
      if [[ "$1" == --out ]]; then out="$2"; else wheels="$2"; fi
      shift 2 ;;
    --dry) dry=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n "$out" ]] || usage
[[ -z "$wheels" || -d "$wheels" ]] || { echo "--wheels $wheels is not a directory" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
  python=.venv/bin/python
fi

pip_install() {
  local sources=()
  if [[ -n "$wheels" ]]; then
    sources=(--no-index --find-links "$wheels")
  fi
  "$python" -m pip install --quiet "${sources[@]}" "$@"
}

cuda_extra() {
  "$python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["cuda"])'
}

if ((dry)); then
  extra=(--dry "${extra[@]}")
elif ! "$python" -c 'import jax, vlm_jax' 2>/dev/null; then
  echo "vlm_jax is not installed: installing it with the cuda extra" >&2
  pip_install -e ".[cuda]"
elif ! "$python" -c 'import jax; jax.devices("gpu")' 2>/dev/null; then
  jax_version="$("$python" -c 'import jax; print(jax.__version__)')"
  read -r -a requirements <<<"$(cuda_extra)"
  echo "JAX $jax_version has no GPU backend: installing ${requirements[*]} for jax==$jax_version" >&2
  pip_install "${requirements[@]}" "jax==$jax_version"
fi
if ((!dry)); then
  "$python" -c 'import jax; print("JAX devices:", jax.devices("gpu"))'
fi

PYTHONUNBUFFERED=1 "$python" benchmarks/gpu_check.py --out "$out" "${extra[@]}"
