#!/bin/bash
# Run the hooks of one directory in name order (docker-stacks' convention):
# *.sh files are sourced, so they can export variables; other executables are run.
# Usage: source run-hooks.sh DIR
if [ "$#" -ne 1 ]; then
    echo "run-hooks.sh: expected one directory, got $#" >&2
    return 1 2>/dev/null || exit 1
fi
if [ ! -d "$1" ]; then
    return 0 2>/dev/null || exit 0
fi
echo "labfleet: running hooks in $1 as uid $(id -u)"
for hook in "$1"/*; do
    [ -e "$hook" ] || continue
    case "$hook" in
        *.sh)
            echo "labfleet: sourcing $hook"
            # shellcheck disable=SC1090
            source "$hook" || { echo "labfleet: hook $hook failed" >&2; return 1 2>/dev/null || exit 1; }
            ;;
        *)
            if [ -x "$hook" ]; then
                echo "labfleet: running $hook"
                "$hook" || { echo "labfleet: hook $hook failed" >&2; return 1 2>/dev/null || exit 1; }
            else
                echo "labfleet: ignoring $hook (neither *.sh nor executable)"
            fi
            ;;
    esac
done
