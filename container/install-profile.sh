#!/bin/sh
# Install one hash-locked requirement profile into /opt/venv: install-profile.sh PROFILE CUDA
set -eu
profile=$1 cuda=$2
here=$(dirname "$0")
cuda_lock=$here/$profile-cu$(echo "$cuda" | tr -d .).txt
if [ -f "$cuda_lock" ]; then
  lock=$cuda_lock
elif [ -f "$here/$profile.txt" ]; then
  lock=$here/$profile.txt
else
  echo "labfleet: profile $profile has no lock for CUDA $cuda: neither requirements/$(basename "$cuda_lock")" \
    "nor requirements/$profile.txt exists. Create it with: container/relock.sh $profile --cuda $cuda" \
    "(add --torch-from-pypi where PyTorch's wheel index is unreachable), then rebuild." >&2
  exit 1
fi
echo "labfleet: installing $(basename "$lock")"
# Wheels only and no dependency resolution: the lock is the whole set, each file by hash.
/opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: -r "$lock"
/opt/venv/bin/pip check
# bash_kernel's wheel carries no kernelspec; register it inside the venv.
if /opt/venv/bin/python -c 'import bash_kernel' 2>/dev/null; then
  /opt/venv/bin/python -m bash_kernel.install --sys-prefix
fi
