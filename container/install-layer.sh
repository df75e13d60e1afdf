#!/bin/sh
# Install one slice of the profile's lock into /opt/venv as one reproducible layer:
#   install-layer.sh /labfleet-lock-NN.txt
#
# Same slice, same files, same layer digest, on any controller and at any time: a rebuild
# caused by a change below this layer then ships nothing for it. What would differ between
# two builds is fixed here: bytecode is compiled by content hash rather than by the time of
# the install (and never checked against the sources, which nobody can change in an image),
# and every file and directory this layer wrote gets SOURCE_DATE_EPOCH as its time.
set -eu
lock=$1
epoch=${SOURCE_DATE_EPOCH:?SOURCE_DATE_EPOCH must be set by the Dockerfile}
started=$(($(date +%s) - 1))
if grep -q '^[A-Za-z0-9]' "$lock"; then
  echo "labfleet: installing $(grep -c '^[A-Za-z0-9]' "$lock") packages: $(sed -n 's/^\([A-Za-z0-9][^=]*\)==.*/\1/p' "$lock" | tr '\n' ' ')"
  # Wheels only and no dependency resolution: the lock is the whole set, each file by hash.
  /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: --no-compile \
    --requirement "$lock"
  find /opt/venv -newermt "@$started" -name '*.py' -type f \
    | PYTHONHASHSEED=0 /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash -i - >/dev/null
fi
# pip's temporary directories leave /tmp with a new time even when they are gone.
find /opt/venv /tmp /root -xdev -newermt "@$started" -exec touch -h -d "@$epoch" {} +
