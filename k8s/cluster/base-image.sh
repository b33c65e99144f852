#!/usr/bin/env bash
# Make the two images the local cluster needs without any registry, once, as docker-archive tars:
#
#   k8s/cluster/base-image.sh OUT_DIR
#
#   OUT_DIR/base.tar   Debian bookworm (debootstrap, minbase) with python3, venv, Java 17 and dumb-init:
#                      the BASE_IMAGE for k8s/Dockerfile when no registry is reachable.
#   OUT_DIR/pause.tar  the pod sandbox image: a static busybox that sleeps until told to stop.
#
# Both come from Debian packages alone. Cached: a warm run is a no-op (the caller keys OUT_DIR on
# this script).
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_NAME=localhost/torchserve-base:bookworm
PAUSE_NAME=localhost/pause:3.2
# What k8s/Dockerfile would otherwise install with apt: the frontend's Java, a venv-capable Python
# and an init for PID 1 that forwards signals.
PACKAGES=python3,python3-venv,openjdk-17-jre-headless,dumb-init,ca-certificates

out=${1:?usage: base-image.sh OUT_DIR}
if [ -f "$out/.complete" ]; then
  echo "base and pause images: cached in $out"
  exit 0
fi
for tool in debootstrap buildah busybox; do
  command -v "$tool" >/dev/null || { echo "base-image: needs $tool (apt-get install debootstrap buildah busybox-static)" >&2; exit 2; }
done
mkdir -p "$out"
work=$(mktemp -d /var/tmp/base-image.XXXXXX)
export STORAGE_DRIVER=vfs
store=(--root "$work/storage" --runroot "$work/run")
cleanup() { buildah "${store[@]}" rm --all >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# --- base: a minimal Debian root filesystem, committed as one layer
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
ctr=$(buildah "${store[@]}" from scratch)
mnt=$(buildah "${store[@]}" mount "$ctr")
cp -a "$work/rootfs/." "$mnt/"
buildah "${store[@]}" umount "$ctr" >/dev/null
buildah "${store[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash "$ctr"
buildah "${store[@]}" commit --quiet "$ctr" "$BASE_NAME" >/dev/null
buildah "${store[@]}" push --quiet "$BASE_NAME" "docker-archive:$out/base.tar.part:$BASE_NAME"
mv "$out/base.tar.part" "$out/base.tar"

# --- pause: PID 1 of every pod sandbox; exits on TERM/INT so a pod stops at once
ctr=$(buildah "${store[@]}" from scratch)
mnt=$(buildah "${store[@]}" mount "$ctr")
mkdir -p "$mnt/bin"
cp "$(command -v busybox)" "$mnt/bin/busybox"
ln -s busybox "$mnt/bin/sh"
ln -s busybox "$mnt/bin/sleep"
buildah "${store[@]}" umount "$ctr" >/dev/null
buildah "${store[@]}" config --entrypoint '["/bin/sh", "-c", "trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' \
  --cmd '' "$ctr"
buildah "${store[@]}" commit --quiet "$ctr" "$PAUSE_NAME" >/dev/null
buildah "${store[@]}" push --quiet "$PAUSE_NAME" "docker-archive:$out/pause.tar.part:$PAUSE_NAME"
mv "$out/pause.tar.part" "$out/pause.tar"
ls -la "$out"
touch "$out/.complete"
