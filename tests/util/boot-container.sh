#!/bin/sh
# Builds the root of a throwaway systemd container and boots systemd in it, for tests/systemd.rs
# (tests/util/container.rs starts it; read that file first). It runs as PID 1 of new pid, mount,
# uts, ipc and cgroup namespaces, started by
#   unshare --pid --fork --kill-child --mount --uts --ipc --cgroup setpriv --bounding-set ... \
#       boot-container.sh NAME SCRATCH TARGET
# and ends by exec'ing systemd, which stays PID 1 of those namespaces.
#
# What keeps the host safe, line by line below:
# - every mount is made in the new mount namespace, after `mount --make-rprivate /`, so none of
#   them propagates to the host;
# - the container's root is an overlay whose lower layer is the host's root file system and whose
#   upper layer is a tmpfs of this namespace: whatever the container writes (dpkg -i, /etc, the
#   journal) lands in memory and is gone when it ends; nothing is written to a host file;
# - /run, /tmp and /dev are its own; /proc is this pid namespace's, with /proc/sys and
#   /proc/sysrq-trigger read-only; /sys is read-only, with a cgroup2 of this cgroup namespace
#   alone at /sys/fs/cgroup (the host's v1 hierarchies are not mounted);
# - /etc/systemd/system is an empty tmpfs, with the target the container boots and a mask for
#   every unit of the host's but systemd's own: the broker, databases and other daemons
#   installed on the host can be neither started nor stopped from inside (stopping
#   rabbitmq-server.service, say, would run rabbitmqctl against the host's node over the shared
#   network). The generators are hidden, so that none turns host config into units.
#
# NAME:    the container's name ($container, the hostname)
# SCRATCH: an empty host directory, covered here by a tmpfs that holds the overlay's layers
# TARGET:  the unit systemd boots (a target wanting basic.target, written here)
set -eu

name=$1
scratch=$2
target=$3

mount --make-rprivate /
mount -t tmpfs -o mode=0700 "$name" "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" \
    "$scratch/root"
root=$scratch/root

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"

# /dev: the basic nodes, a devpts instance of its own and /dev/shm; no disks, no kmsg.
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
mknod -m 0666 "$root/dev/null" c 1 3
mknod -m 0666 "$root/dev/zero" c 1 5
mknod -m 0666 "$root/dev/full" c 1 7
mknod -m 0666 "$root/dev/random" c 1 8
mknod -m 0666 "$root/dev/urandom" c 1 9
mknod -m 0666 "$root/dev/tty" c 5 0
mkdir "$root/dev/pts" "$root/dev/shm" "$root/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"

# /proc of this pid namespace. A bind mount made read-only changes that mount only, never the
# file system under it.
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
for path in "$root/proc/sys" "$root/proc/sysrq-trigger"; do
    [ -e "$path" ] || continue
    mount --bind "$path" "$path"
    mount -o remount,bind,ro "$path"
done

# /sys read-only (sysfs is shared with the host's network namespace, so it is mounted, then made
# read-only as a bind: its superblock is the host's), and a cgroup2 rooted at this cgroup
# namespace, which is a cgroup of its own (container.rs moved us there before unshare).
mount -t sysfs -o nosuid,nodev,noexec sysfs "$root/sys"
mount -o remount,bind,ro "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

# The units: only the target booted, plus a mask for every unit file of the host's but
# systemd's own (and warren's, which the test installs).
mount -t tmpfs -o mode=0755 tmpfs "$root/etc/systemd/system"
cat >"$root/etc/systemd/system/$target" <<EOF
[Unit]
Description=warren's systemd tests
Requires=basic.target
After=basic.target
EOF
for dir in /usr/lib/systemd/system /lib/systemd/system /etc/systemd/system \
    /usr/local/lib/systemd/system; do
    [ -d "$dir" ] || continue
    for unit in "$dir"/*.service "$dir"/*.socket "$dir"/*.timer "$dir"/*.path; do
        [ -e "$unit" ] || [ -L "$unit" ] || continue
        unit=${unit##*/}
        case $unit in
        systemd-* | warren.service | warren@.service) ;;
        *) ln -sfn /dev/null "$root/etc/systemd/system/$unit" ;;
        esac
    done
done
for dir in /usr/lib/systemd/system-generators /usr/local/lib/systemd/system-generators \
    /etc/systemd/system-generators; do
    if [ -d "$root$dir" ]; then
        mount -t tmpfs -o mode=0755,ro tmpfs "$root$dir"
    fi
done

hostname "$name"

mkdir "$root/run/old-root"
cd "$root"
pivot_root . run/old-root
cd /
umount -l /run/old-root
rmdir /run/old-root
# systemd makes / shared when the kernel starts it, but leaves that to the container manager in a
# container. It needs it: a unit's credentials (LoadCredential=) are mounted in a child namespace
# and moved into /run/credentials, which PID 1 sees only through shared propagation. The peer
# groups made here are this namespace's own: the host's mounts were made private above, and are
# no longer here.
mount --make-rshared /

exec env -i container="$name" /lib/systemd/systemd --unit="$target" --show-status=no
