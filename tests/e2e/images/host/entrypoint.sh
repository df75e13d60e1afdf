#!/bin/sh
# Docker hands the container /sys and the cgroup hierarchies read-only. systemd, and the
# Docker engine that labfleet installs inside the host, both need to write there. A plain
# remount of a cgroup hierarchy answers "busy"; a bind remount works.
set -eu

mount -o remount,rw /sys
for hierarchy in /sys/fs/cgroup/*/; do
    mount -o remount,bind,rw "$hierarchy"
done

# The init arguments differ per distribution: systemd 256 and later refuse cgroup v1
# unless forced, and they read their "kernel command line" from PID 1's arguments.
# shellcheck disable=SC2046
exec /sbin/init $(cat /etc/labfleet-test/init-args)
