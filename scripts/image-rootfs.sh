#!/usr/bin/env bash
# Assembles the image's root filesystem from a built `shardseek` binary: the binary, exactly the
# shared libraries it links (as `ldd` resolves them, the dynamic loader included), a passwd/group
# entry for the non-root user, an empty world-writable /tmp, and the host's CA bundle (for
# `shardseek model pull` from an https:// hub). Nothing else: no shell, no package manager. Used by the Containerfile's build stage and by CI (.ci/image-check.sh), which
# copies the result into a `FROM scratch` image without any registry.
#
# usage: scripts/image-rootfs.sh BINARY ROOTFS_DIR
set -euo pipefail
bin="$1"
root="$2"
uid=65532

[[ -x "$bin" ]] || { echo "not an executable: $bin" >&2; exit 1; }
rm -rf "$root"
mkdir -p "$root/usr/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/dev"
install -m 0755 "$bin" "$root/usr/bin/shardseek"
if command -v strip >/dev/null && [[ "${STRIP:-1}" == 1 ]]; then
  strip --strip-debug "$root/usr/bin/shardseek"
fi

# Every library the loader would map, and the loader itself, at the same absolute paths.
ldd "$bin" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
  real="$(readlink -f "$lib")"
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$real" "$root$lib"
done

cat > "$root/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:$uid:$uid:nonroot:/tmp:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<GROUP
root:x:0:
nonroot:x:$uid:
GROUP
# Host names resolve through DNS first (the router resolves the attention Service continuously).
echo "hosts: files dns" > "$root/etc/nsswitch.conf"
# `model pull` verifies https:// hubs against the system roots (rustls-native-certs reads this
# path); without it every pull from huggingface.co would fail in the image.
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
[[ -f "$ca" ]] || { echo "no CA bundle at $ca (install ca-certificates or set CA_BUNDLE)" >&2; exit 1; }
mkdir -p "$root/etc/ssl/certs"
cp -L "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$root/tmp"
echo "rootfs in $root: $(du -sh "$root" | cut -f1), $(find "$root" -type f | wc -l) files"
