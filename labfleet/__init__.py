"""labfleet: identical CUDA JupyterLab workstations from one pyinfra deploy."""
