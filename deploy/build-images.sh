#!/usr/bin/env bash
# Build the server and client images with buildah where neither Docker Hub nor the PyTorch index is reachable,
# from the same deploy/Dockerfile.* that build the published images:
#   1. a Debian bookworm base image bootstrapped here (debootstrap from a Debian mirror: python3 + venv),
#      committed as localhost/mixshow-base:bookworm (kept, so a second run starts at step 2);
#   2. both Dockerfiles built on it (build arg BASE) with torch from a local CPU wheel (build arg TORCH, the
#      wheel's folder mounted read-only into the build); the rest comes from the package index;
#   3. each image checked by running it: the Flower apps import, and `mixshow make-tiny-base` builds a tiny
#      Stable Diffusion folder inside it that `mixshow fuse`'s loader reads back.
# Needs root, buildah and debootstrap (Debian packages). Builds run with chroot isolation and the vfs storage
# driver, which work without a container runtime or overlay mounts; CUDA is not checked (CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=${MIXSHOW_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1)}
MIRROR=${MIXSHOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/mixshow-base:bookworm
B=(buildah --storage-driver vfs)
[ -n "$WHEEL" ] && [ -f "$WHEEL" ] || { echo "no torch wheel: set MIXSHOW_TORCH_WHEEL to a torch 2.13.0 CPU wheel" >&2; exit 2; }
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed (apt-get install $tool)" >&2; exit 2; }
done

if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "== bootstrapping $BASE from $MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  cp -a "$rootfs"/. "$mnt"/
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  "${B[@]}" commit -q "$ctr" "$BASE" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

# Behind a TLS-intercepting proxy the package index is signed by a local CA: MIXSHOW_BUILD_CA (default: the
# CA bundle pip uses here, if set) is mounted into the build with a pip.conf naming it; nothing of it stays
# in the images.
CA=${MIXSHOW_BUILD_CA:-${PIP_CERT:-}}
MOUNTS=(-v "$(dirname "$WHEEL")":/wheels:ro)
if [ -n "$CA" ]; then
  pipconf=$(mktemp)
  trap 'rm -f "$pipconf"' EXIT
  printf '[global]\ncert = /run/build-ca.crt\n' > "$pipconf"
  MOUNTS+=(-v "$CA":/run/build-ca.crt:ro -v "$pipconf":/etc/pip.conf:ro)
fi

for side in server client; do
  echo "== building localhost/mixshow-$side:local from deploy/Dockerfile.$side"
  "${B[@]}" bud -q --isolation chroot --layers=false -f "deploy/Dockerfile.$side" \
    --build-arg BASE="$BASE" --build-arg TORCH="/wheels/$(basename "$WHEEL")" \
    "${MOUNTS[@]}" -t "localhost/mixshow-$side:local" . >/dev/null
  ctr=$("${B[@]}" from "localhost/mixshow-$side:local")
  "${B[@]}" run --isolation chroot "$ctr" -- sh -c '
    set -e
    python -c "import server.app, client.app, flwr; print(\"apps import; flwr\", flwr.__version__)"
    mixshow make-tiny-base /tmp/tiny >/dev/null
    python -c "
from shared.base import load_base
base = load_base(\"/tmp/tiny\")
print(\"tiny base built and loaded in the image:\", type(base.unet).__name__, base.fingerprint[:12])"'
  "${B[@]}" rm "$ctr" >/dev/null
  echo "localhost/mixshow-$side:local built and checked: $("${B[@]}" images --format '{{.Size}}' "localhost/mixshow-$side:local")"
done
