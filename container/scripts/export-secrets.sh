#!/bin/bash
# Export each secret that LABFLEET_SECRETS names from its file, /run/secrets/<NAME> (a
# read-only mount of the host's /opt/labfleet/<user>/secrets/<NAME>), into the environment
# that the server, and so every kernel and terminal, inherits. The values never pass through
# an argument, the container's configuration or a log line.
# Usage: source export-secrets.sh   (LABFLEET_SECRETS_DIR: where the files are, /run/secrets)
for _labfleet_name in ${LABFLEET_SECRETS:-}; do
    _labfleet_file=${LABFLEET_SECRETS_DIR:-/run/secrets}/$_labfleet_name
    if [ ! -r "$_labfleet_file" ]; then
        echo "labfleet: secret $_labfleet_name: $_labfleet_file is missing or unreadable as uid $(id -u); run the deploy again" >&2
        return 1 2>/dev/null || exit 1
    fi
    # $(<file) drops trailing newlines, as an editor leaves one after a token.
    export "$_labfleet_name=$(<"$_labfleet_file")"
done
unset _labfleet_name _labfleet_file
