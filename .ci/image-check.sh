#!/usr/bin/env bash
# Builds the container image offline and runs its entrypoint from the image's own root
# filesystem, the way a container runtime would (but without one: `podman run` needs kernel
# features CI machines lack):
#   1. scripts/image-rootfs.sh collects the host-built binary and the libraries it links;
#   2. `podman build --storage-driver vfs --target prebuilt` puts them in a FROM scratch image
#      tagged with the chart's default image (repository from values.yaml, tag = appVersion);
#   3. the image is exported, unpacked, and its ENTRYPOINT runs under chroot as the image's USER,
#      with the root filesystem mounted read-only and a tmpfs on /tmp (what the pods get):
#      `shardseek --version` and `shardseek up --demo` (a whole local cluster answering one
#      OpenAI chat request).
# Needs root (mount namespace, chroot). Installs podman with apt-get when it is missing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v podman >/dev/null; then
  echo "== apt-get install podman"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman >/dev/null
fi
podman --version

# The tag the chart deploys by default.
repository="$(awk '/^image:/ {i=1} i && /repository:/ {print $2; exit}' charts/shardseek/values.yaml)"
version="$(awk -F'"' '/^appVersion:/ {print $2}' charts/shardseek/Chart.yaml)"
image="$repository:$version"

# The binary CI's `cargo test --workspace` built (a no-op build when it is fresh).
cargo build --quiet -p shardseek
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/shardseek"

work="$(mktemp -d)"
store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
  podman "${store[@]}" rm -a -f >/dev/null 2>&1 || true
  # vfs layers may hold read-only directories; make them removable first.
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== image root filesystem"
mkdir -p "$work/context"
cp Containerfile "$work/context/"
scripts/image-rootfs.sh "$bin" "$work/context/rootfs"

echo "== podman build $image"
podman "${store[@]}" build --quiet --target prebuilt -t "$image" -f "$work/context/Containerfile" "$work/context"
podman "${store[@]}" image ls "$image"
user="$(podman "${store[@]}" image inspect --format '{{.Config.User}}' "$image")"
entrypoint="$(podman "${store[@]}" image inspect --format '{{range .Config.Entrypoint}}{{.}} {{end}}' "$image")"
env_list="$(podman "${store[@]}" image inspect --format '{{range .Config.Env}}{{.}} {{end}}' "$image")"
echo "user=$user entrypoint=$entrypoint env=$env_list"
case "$user" in 0|0:*|root|root:*|"") echo "the image must not run as root (USER=$user)" >&2; exit 1 ;; esac

echo "== unpack"
rootfs="$work/rootfs"
mkdir -p "$rootfs"
container="$(podman "${store[@]}" create "$image")"
podman "${store[@]}" export "$container" | tar -x -C "$rootfs"
podman "${store[@]}" rm "$container" >/dev/null

# Runs the entrypoint with ARGS inside the unpacked image: read-only root, tmpfs /tmp, /proc,
# the image's USER and ENV, nothing from the host.
run_in_image() {
  # shellcheck disable=SC2086 # the image's ENV and ENTRYPOINT are word lists
  unshare --mount --fork -- sh -eu -c '
    root="$1"; user="$2"; shift 2
    mount --bind "$root" "$root"
    mount -o remount,bind,ro "$root"
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    exec "$@"
  ' sh "$rootfs" "$user" env -i $env_list chroot --userspec="$user" "$rootfs" $entrypoint "$@"
}

echo "== shardseek --version (from the image)"
run_in_image --version

echo "== shardseek up --demo (from the image)"
start=$SECONDS
run_in_image up --demo --port 0 | tee "$work/demo.log"
grep -q '^HTTP/1.1 200' "$work/demo.log"
grep -q '"chat.completion"' "$work/demo.log"
echo "up --demo from the image answered in $((SECONDS - start)) s"
