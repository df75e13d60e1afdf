#!/bin/bash
# The default command: JupyterLab, configured by /etc/jupyter/jupyter_server_config.py.
# Extra arguments go to `jupyter lab`, e.g. `docker run IMAGE start-notebook.sh --debug`.
exec jupyter lab "$@"
