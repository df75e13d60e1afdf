#!/bin/bash
# Give NB_USER the host's NB_UID and NB_GID and a HOME; run as root.
# Idempotent, so a restarted container passes through it again unchanged. It touches only
# /etc/passwd, /etc/group and /home/$NB_USER: never /workspace nor the datasets.
set -euo pipefail

: "${NB_USER:?}" "${NB_UID:?}" "${NB_GID:?}"
NB_GROUP=${NB_GROUP:-$NB_USER}
home=/home/$NB_USER

for value in "$NB_UID" "$NB_GID"; do
    case "$value" in
        '' | *[!0-9]*) echo "labfleet: NB_UID and NB_GID must be numbers, got NB_UID=$NB_UID NB_GID=$NB_GID" >&2; exit 1 ;;
    esac
done
if [ "$NB_UID" -eq 0 ]; then
    echo "labfleet: NB_UID=0 would run JupyterLab as root; set jupyter_user to a normal account" >&2
    exit 1
fi

# The group: reuse whichever group already has NB_GID (e.g. 100 "users"), else make one.
if ! getent group "$NB_GID" >/dev/null; then
    if getent group "$NB_GROUP" >/dev/null; then
        groupmod --gid "$NB_GID" "$NB_GROUP"
    else
        groupadd --gid "$NB_GID" "$NB_GROUP"
    fi
fi

# The user: the image has none of its own, so the first start creates it. A UID that a
# system account already holds is shared (--non-unique), as the host's UID is what counts.
if id -u "$NB_USER" >/dev/null 2>&1; then
    [ "$(id -u "$NB_USER")" = "$NB_UID" ] || usermod --non-unique --uid "$NB_UID" "$NB_USER"
    [ "$(id -g "$NB_USER")" = "$NB_GID" ] || usermod --gid "$NB_GID" "$NB_USER"
else
    useradd --no-log-init --non-unique --uid "$NB_UID" --gid "$NB_GID" \
        --home-dir "$home" --no-create-home --shell /bin/bash "$NB_USER"
fi

# HOME is normally the host's home_dir, mounted here and already the user's (labfleet makes
# it 0700); without that mount it is made in the container's own layer. Only the directory
# itself is ever chowned, never what is in it, and a mode someone chose is kept.
if [ ! -d "$home" ]; then
    mkdir -p -m 0700 "$home"
fi
[ "$(stat -c %u:%g "$home")" = "$NB_UID:$NB_GID" ] || chown "$NB_UID:$NB_GID" "$home"

# The datasets' group on the host (labfleet's datasets_group, by number): the user joins it,
# so datasets marked readonly: False are writable and read-only ones stay readable.
if [ -n "${DATASET_DIR:-}" ] && [ -d "$DATASET_DIR" ]; then
    data_gid=$(stat -c %g "$DATASET_DIR")
    if [ "$data_gid" != 0 ] && [ "$data_gid" != "$NB_GID" ]; then
        data_group=$(getent group "$data_gid" | cut -d: -f1 || true)
        if [ -z "$data_group" ]; then
            data_group=labdata
            getent group "$data_group" >/dev/null && data_group=labdata-$data_gid
            groupadd --gid "$data_gid" "$data_group"
        fi
        case " $(id -nG "$NB_USER") " in
            *" $data_group "*) ;;
            *) usermod --append --groups "$data_group" "$NB_USER" ;;
        esac
    fi
fi
