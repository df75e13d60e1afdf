#!/bin/bash
# The entrypoint (docker-stacks' start.sh, slimmed): as root, map the user, run the hooks,
# then drop to NB_UID:NB_GID for good and exec the command (start-notebook.sh by default).
# Started as another user (docker run --user), it runs the hooks and execs as that user.
set -euo pipefail

source /usr/local/bin/run-hooks.sh /usr/local/bin/start-notebook.d

if [ "$(id -u)" -ne 0 ]; then
    export HOME=${HOME:-/tmp}
    [ -w "$HOME" ] || export HOME=/tmp
    source /usr/local/bin/export-secrets.sh
    [ "$HOME" = /tmp ] || /usr/local/bin/seed-home.sh
    source /usr/local/bin/run-hooks.sh /usr/local/bin/before-notebook.d
    exec "$@"
fi

/usr/local/bin/map-user.sh

# The secrets are bind mounts from the host; the server reads them after the drop, so say
# now, and clearly, if it will not be able to.
for secret in "${JUPYTER_TOKEN_FILE:-}" "${JUPYTER_PASSWORD_HASH_FILE:-}"; do
    [ -n "$secret" ] || continue
    if [ ! -f "$secret" ]; then
        echo "labfleet: $secret does not exist; mount the secret there or unset the variable naming it" >&2
        exit 1
    fi
    if ! setpriv --reuid="$NB_UID" --regid="$NB_GID" --clear-groups test -r "$secret"; then
        echo "labfleet: $secret is not readable by uid $NB_UID; on the host, chown it to $NB_UID and chmod 600" >&2
        exit 1
    fi
done

export HOME=/home/$NB_USER USER=$NB_USER LOGNAME=$NB_USER SHELL=/bin/bash
cd "${WORKSPACE_DIR:-/workspace}" 2>/dev/null || cd "$HOME"

source /usr/local/bin/export-secrets.sh
setpriv --reuid="$NB_UID" --regid="$NB_GID" --init-groups /usr/local/bin/seed-home.sh

source /usr/local/bin/run-hooks.sh /usr/local/bin/before-notebook.d

# setpriv changes the IDs in place (no setuid binary, no new privileges) and drops every
# capability, so nothing after this line can become root again.
exec setpriv --reuid="$NB_UID" --regid="$NB_GID" --init-groups \
    --inh-caps=-all --bounding-set=-all -- "$@"
