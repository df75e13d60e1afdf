#!/bin/bash
# Give HOME the image's defaults that it lacks (bash's dotfiles from /etc/skel, and whatever an
# image adds there); run as the user, after the drop, so what it makes is theirs. A file that
# exists is never replaced, nor an existing directory's owner and mode (GNU tar's
# --skip-old-files leaves both alone), so HOME stays 0700 and the user's settings win.
# JupyterLab's defaults (overrides.json) live in the image, outside HOME, and apply until the
# user changes a setting, which JupyterLab then writes to ~/.jupyter/lab/user-settings.
set -euo pipefail
skel=${1:-/etc/skel}
[ -d "$skel" ] && [ -w "${HOME:?}" ] || exit 0
tar -C "$skel" -cf - . | tar -C "$HOME" -xf - --skip-old-files
