#!/usr/bin/env bash
# Assembles the image's root filesystem from a built `shardseek` binary: the binary, exactly the
# shared libraries it links (as `ldd` resolves them, the dynamic loader included), a passwd/group
# entry for the non-root user, and an empty world-writable /tmp. Nothing else: no shell, no
# package manager. Used by the Containerfile's build stage and by CI (.ci/image-check.sh), which
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
chmod 1777 "$root/tmp"
echo "rootfs in $root: $(du -sh "$root" | cut -f1), $(find "$root" -type f | wc -l) files"
