#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine (which has the NVIDIA driver, CUDA and
# Python, but no Rust and no network) and packs it into gpu-bundle/ (git-ignored):
# the release binary and the two CUDA test binaries, stripped and xz-compressed into one tar,
# plus the reference fixtures. Run it here, then pass `gpu-bundle` in the device tool's carry
# and run `bash scripts/gpu-check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/stage"
cargo build --release --features cuda
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/shardseek" "$out/stage/shardseek"
# The test binaries: cargo prints their paths with --message-format json.
for spec in "-p shardseek-kernels --test kernels" "-p shardseek-worker --test model"; do
  # shellcheck disable=SC2086
  path=$(cargo test --features cuda $spec --no-run --message-format json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
  name=$(echo "$spec" | awk "{print \$2}" | sed "s/shardseek-//")-$(echo "$spec" | awk "{print \$4}")
  cp "$path" "$out/stage/$name"
done
strip "$out"/stage/*
tar -C "$out/stage" -cJf "$out/bin.tar.xz" .
rm -rf "$out/stage"
cp -r testdata/fixtures "$out/fixtures"
du -sh "$out" "$out"/*
