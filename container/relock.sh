#!/usr/bin/env bash
# Re-lock one requirement profile: requirements/<profile>.in -> a hash-locked .txt beside it,
# and its layer slices in <lock>.layers/ (layer_locks.py).
#
#   container/relock.sh jupyter                           -> requirements/jupyter.txt
#   container/relock.sh cpu                               -> requirements/cpu.txt
#   container/relock.sh pytorch --cuda 12.8               -> requirements/pytorch-cu128.txt
#   container/relock.sh pytorch --cuda 12.8 --torch-from-pypi
#
# Where torch comes from is a line in the .in file:
#   "# torch-index: cuda"  torch from PyTorch's index for the CUDA line (--cuda, default 12.8);
#                          the lock is per CUDA line: <profile>-cu<NNN>.txt
#   "# torch-index: cpu"   torch from PyTorch's CPU index; the lock is <profile>.txt
#   no such line           PyPI only; the lock is <profile>.txt
# --torch-from-pypi locks a CUDA profile from PyPI alone, with torch held to the releases
# whose PyPI wheels are built for that CUDA line (PYPI_TORCH below): for networks that reach
# PyPI but not PyTorch's index. The image then runs the same CUDA runtime.
#
# The lock is universal (one file for Python 3.12 on Ubuntu 24.04 and 3.13 on Debian 13),
# wheels only (the image build compiles nothing), with every file's hash. uv is used from
# PATH, or installed into a throwaway venv. Behind a TLS-inspecting proxy, put its CA into
# the system trust store first: uv is told to use it.
set -euo pipefail

TORCH_INDEX=https://download.pytorch.org/whl
PYTHON_FLOOR=3.12
# PyPI's torch releases by the CUDA line their Linux x86_64 wheels are built for (checked
# against the wheels' nvidia-cuda-runtime requirement; 2.15 is built for CUDA 13.2).
# torchaudio no longer pins torch exactly, so it is held to the same minor release here;
# torchaudio stops at 2.11, which is what holds CUDA 13.0 to torch 2.11.
declare -A PYPI_TORCH=(
  [12.6]="torch>=2.7,<2.8 torchaudio>=2.7,<2.8"
  [12.8]="torch>=2.10,<2.11 torchaudio>=2.10,<2.11"
  [13.0]="torch>=2.11,<2.12 torchaudio>=2.11,<2.12"
)

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

profile="" cuda=12.8 from_pypi=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=${2:?--cuda needs a version like 12.8}; shift 2 ;;
    --torch-from-pypi) from_pypi=1; shift ;;
    -h|--help) usage ;;
    -*) echo "relock: unknown option $1" >&2; usage ;;
    *) [ -z "$profile" ] || usage; profile=$1; shift ;;
  esac
done
[ -n "$profile" ] || usage

cd "$(dirname "$0")/requirements"
if [ ! -f "$profile.in" ]; then
  echo "relock: no profile $profile: requirements/$profile.in does not exist" \
    "(profiles: $(ls ./*.in | sed 's|^\./||; s|\.in$||' | tr '\n' ' '))" >&2
  exit 1
fi

kind=$(sed -n 's/^# *torch-index: *\([a-z]*\).*/\1/p' "$profile.in" | head -n1)
index_args=() constraint="" out="$profile.txt" extra_index="" tools=""
trap 'rm -rf ${tools:+"$tools"} ${constraint:+"$constraint"}' EXIT
command="container/relock.sh $profile"
case "$kind" in
  "") ;;
  cpu) extra_index=$TORCH_INDEX/cpu ;;
  cuda)
    out="$profile-cu${cuda//./}.txt"
    command+=" --cuda $cuda"
    if [ "$from_pypi" = 1 ]; then
      if [ -z "${PYPI_TORCH[$cuda]:-}" ]; then
        echo "relock: PyPI has no torch build for CUDA $cuda; known: ${!PYPI_TORCH[*]}." \
          "Lock from PyTorch's index instead (drop --torch-from-pypi)." >&2
        exit 1
      fi
      # Relative, so the lock's annotations name it and no path of this machine.
      constraint=torch-from-pypi-cu${cuda//./}.constraints
      tr ' ' '\n' <<<"${PYPI_TORCH[$cuda]}" >"$constraint"
      command+=" --torch-from-pypi"
    else
      extra_index=$TORCH_INDEX/cu${cuda//./}
    fi
    ;;
  *) echo "relock: $profile.in says torch-index: $kind; expected cuda or cpu" >&2; exit 1 ;;
esac
if [ -n "$extra_index" ]; then
  # PyTorch's index is searched first, and every package it has is taken from it (uv's
  # first-index strategy): PyPI's newer torch would otherwise win over the +cu/+cpu builds.
  index_args=(--extra-index-url "$extra_index")
fi

uv=$(command -v uv || true)
if [ -z "$uv" ]; then
  tools=$(mktemp -d)
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check uv
  uv=$tools/venv/bin/uv
fi

export UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never
"$uv" pip compile "$profile.in" \
  --universal --python-version "$PYTHON_FLOOR" \
  --generate-hashes --no-build --upgrade \
  "${index_args[@]}" ${constraint:+--constraint "$constraint"} \
  --custom-compile-command "$command" \
  --output-file "$out.new" --quiet
if [ -n "$extra_index" ]; then
  # pip in the image build needs the index too; hashes pin the files either way.
  { echo "--extra-index-url $extra_index"; cat "$out.new"; } >"$out"
  rm "$out.new"
else
  mv "$out.new" "$out"
fi
echo "relock: wrote container/requirements/$out" >&2
# The image installs the lock in slices, one layer each; cut them from this one resolution.
python3 ../layer_locks.py "$out"
echo "relock: wrote container/requirements/${out%.txt}.layers/" >&2
