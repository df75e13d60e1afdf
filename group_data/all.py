"""Every labfleet setting with its default. Override per group (group_data/<group>.py),
per host (inventory.py) or per run (--data key=value). labfleet/settings.py validates
all of them for every host before anything runs.

A new setting is its default here, with a one-line comment above it, plus its field (type,
check, expected form) on Settings in labfleet/model.py; tests/unit/test_settings.py checks
that the two list the same keys."""

# --- GPU ---------------------------------------------------------------------------
# "auto" detects NVIDIA GPUs (PCI vendor 10de or /proc/driver/nvidia); true/false overrides.
gpu = "auto"
# GPUs reserved for the container: "all", a count such as 2, or device ids ["0", "GPU-<uuid>"].
gpu_devices = "all"

# --- Docker Engine -----------------------------------------------------------------
# "docker-ce" uses Docker's apt repository; "distro" uses the distribution's docker.io.
docker_source = "docker-ce"
# Base URL of Docker's apt repository, or of a mirror / local repository for offline labs.
docker_apt_mirror = "https://download.docker.com/linux"
# Pins the engine packages to one version (e.g. "5:27.3.1-1~debian.12~bookworm"); None = latest.
docker_version = None
# Packages to install; None = the source's default list (docker-ce: docker-ce, docker-ce-cli,
# containerd.io, docker-buildx-plugin, docker-compose-plugin; distro: docker.io, docker-cli, compose v2, buildx).
docker_packages = None
# Users added to the docker group.
docker_users = []
# Keys merged into /etc/docker/daemon.json; keys you set by hand are never removed.
docker_daemon = {}

# --- NVIDIA Container Toolkit -------------------------------------------------------
# "auto" installs the toolkit where there is a GPU (see gpu); true also on hosts still waiting for one.
nvidia_toolkit = "auto"
# NVIDIA's toolkit apt repository (it holds <arch>/), or a mirror that keeps NVIDIA's layout.
nvidia_toolkit_apt_mirror = "https://nvidia.github.io/libnvidia-container/stable/deb"
# URL of the repository's signing key; None = NVIDIA's layout, gpgkey two levels above the mirror.
nvidia_toolkit_apt_key = None
# Pins the four toolkit packages to one version, at least 1.17.8 (e.g. "1.17.8-1"); None = the newest
# at the first install, then held there against apt upgrade (an older one is upgraded to 1.17.8+).
nvidia_toolkit_version = None
# Makes nvidia Docker's default runtime (only needed by tools that cannot ask for GPUs).
nvidia_default_runtime = False
# Host driver version below which a GPU host stops with an error; None derives it from cuda.
nvidia_driver_min = None
# On a GPU host whose driver is missing or too old: install the distribution's driver and reboot.
nvidia_driver_install = False
# Pins the driver packages to one release (e.g. "580.95.05"; needs nvidia_driver_install); None = held
# at the version installed. Either way apt upgrade and unattended-upgrades leave the driver alone.
nvidia_driver_version = None

# --- Image ---------------------------------------------------------------------------
# CUDA line of the image: selects the PyTorch wheel index and the driver floor.
cuda = "12.8"
# Requirement profile to build: a container/requirements/<profile>.in file.
image_profile = "pytorch"
# "build" on every host, "ship" from the controller, or "registry" push once / pull by digest.
image_delivery = "build"
# Registry (host:port) for image_delivery = "registry".
image_registry = None
# Address the registry host (inventory group `registry`) listens on.
registry_listen = "0.0.0.0:5000"
# Where the registry host keeps the image layers.
registry_storage = "/var/lib/docker-registry"
# Base of the image, pinned by digest.
base_image = "ubuntu:24.04@sha256:80dd3c3b9c6cecb9f1667e9290b3bc61b78c2678c02cbdae5f0fea92cc6734ab"
# PEM files on the controller trusted by hosts and image builds (TLS-inspecting proxies).
extra_ca_certificates = []

# --- Data ----------------------------------------------------------------------------
# Host directory that holds the datasets; mounted at /resource/datasets in the container.
datasets_root = "/srv/datasets"
# Datasets by name: {"source": "manual" | "local:<path>" | "host:<host>:<path>" | "nfs:<server>:<export>",
#                    "readonly": True, "prune": False, "manifest": None}
datasets = {}
# Group that owns datasets_root; jupyter users join it and may write in readonly: False datasets.
datasets_group = "labdata"
# Hosts that pull a host: dataset from this one at once (the rest from earlier pullers); None: all.
dataset_fanout = 2
# How the other hosts reach this one for host: dataset pulls (IP or DNS name); None = its ssh_hostname.
lan_address = None
# SSH port the other hosts use to reach this one; None = its ssh_port when lan_address is None, else 22.
lan_ssh_port = None
# Host directory mounted at /workspace; "{user}" becomes the jupyter user's name.
workspace_dir = "/srv/workspace/{user}"
# Host directory mounted as the user's HOME (settings, ~/.ssh, pip --user, caches); "{user}" as above.
home_dir = "/srv/home/{user}"

# --- JupyterLab ----------------------------------------------------------------------
# Host account whose UID/GID own what the container writes; None = the SSH user (or you, on @local).
jupyter_user = None
# Several users on one host: names or {"name": ..., "port": ...}; ports default to jupyter_port + index.
jupyter_users = []
# Host port published for JupyterLab (the first user's, when there are several).
jupyter_port = 8888
# Address the port is published on; keep 127.0.0.1 and reach it through an SSH tunnel.
jupyter_bind = "127.0.0.1"
# Plain environment variables for every user's server and kernels, e.g. {"WANDB_PROJECT": "lab"}.
jupyter_env = {}
# Secrets: variable name -> a file on the controller, e.g. {"WANDB_API_KEY": "~/.secrets/wandb"}.
jupyter_secrets = {}
# "when-idle": a running container is recreated only once its kernels, terminals and GPU work are idle.
jupyter_update = "when-idle"
# How long every kernel must have been quiet before "when-idle" recreates its container.
jupyter_update_idle = "30m"
# Kernels idle this long are shut down so they give back GPU memory ("off" keeps them); a running cell is never cut.
jupyter_cull_idle = "24h"
# argon2 password hash (jupyter_server.auth.passwd); None = a random token kept per host and user.
jupyter_password_hash = None
# /dev/shm size for the container, so DataLoader workers do not die with bus errors.
shm_size = "16g"
# Container ulimits: memlock unlimited (-1) for pinned-memory DataLoaders, stack 64 MiB as NGC uses.
ulimits = {"memlock": -1, "stack": 67108864}

# --- Replacing a PC ------------------------------------------------------------------
# The old PC (its inventory name) whose users' workspaces and homes this host pulls; None = none.
migrate_from = None
# The cut-over: stop each user's JupyterLab on the old PC, pull what changed, start it here.
migrate_final = False

# --- Backups (restic, from the distribution) -------------------------------------------
# restic repository of workspaces and homes: "/mnt/backup/restic", "sftp:backup@nas.lab:/srv/restic"; None = none.
backup_repository = None
# File on the controller holding the repository's password; copied to each host 0600, never printed.
backup_password_file = None
# SSH private key on the controller for sftp: (authorise its .pub on the server); None = root's own key.
backup_ssh_key = None
# When the backup timer runs (systemd OnCalendar): "daily", "hourly", "*-*-* 02:30", "Mon..Fri 22:00".
backup_schedule = "daily"
# Snapshots kept per user and directory (restic forget --keep-<kind> N); the others are pruned.
backup_keep = {"daily": 7, "weekly": 4, "monthly": 6}
# "backup" or "backup:<old host>": restore each user's workspace and home once, before JupyterLab comes up.
restore_from = None
