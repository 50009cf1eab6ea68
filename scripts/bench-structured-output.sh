#!/usr/bin/env bash
# Structured output's cost: throughput at 8 concurrent requests with and without a JSON schema
# (testdata/bench-schema.json: an array of at least 200 integers, so both runs generate the same
# number of tokens), and the grammar mask's cost per engine step from the attention pod's
# counters. Runs `shardseek up` on a generated tiny model (2 expert shards).
#
#   scripts/bench-structured-output.sh [path/to/shardseek]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/debug/shardseek}
WORK=$(mktemp -d)
trap 'kill $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$B" model gen --preset tiny --dtype fp8 --out "$WORK/model" > /dev/null
PORT=${PORT:-18431}
"$B" up --model "$WORK/model" --expert-shards 2 --port "$PORT" > "$WORK/up.log" 2>&1 &
UP=$!
for _ in $(seq 120); do grep -q "shardseek up:" "$WORK/up.log" && break; sleep 1; done
# The attention pod serves its /metrics on its own port.
POD=$(ps -o args= --ppid "$UP" | grep -- "--role attention" | grep -o -- "--listen [0-9.:]*" | cut -d' ' -f2)
snap() { curl -s "$POD/metrics" | grep -E "^shardseek_(grammar|engine_step)" > "$1"; }
run() {
  "$B" bench serve --url "http://127.0.0.1:$PORT" --requests 32 --concurrency 8 --input-len 64 \
    --output-len 96 --vocab 200 --json "$@"
}
run > /dev/null # warm-up
snap "$WORK/a"; run > "$WORK/plain.json"
snap "$WORK/b"; run --json-schema testdata/bench-schema.json > "$WORK/schema.json"
snap "$WORK/c"
python3 - "$WORK" <<'EOF'
import json, sys
w = sys.argv[1]
def m(name):
    return {k: float(v) for k, v in (l.split() for l in open(f"{w}/{name}"))}
for run, x, y in (("plain", m("a"), m("b")), ("schema", m("b"), m("c"))):
    j = json.load(open(f"{w}/{run}.json"))
    d = lambda k: y[k] - x[k]
    steps = max(d("shardseek_engine_steps_total"), 1)
    masks = d("shardseek_grammar_masks_total")
    print(f"{run:6}: {j['completed']} ok, {j['failed']} failed, {j['total_output_tokens']} output tokens, "
          f"{j['output_token_throughput']:.1f} output tok/s, TPOT {j['tpot']['mean_ms']:.2f} ms, "
          f"step {1e3 * d('shardseek_engine_step_seconds_total') / steps:.2f} ms, "
          f"mask {1e6 * d('shardseek_grammar_mask_seconds_total') / steps:.0f} us/step "
          f"({1e6 * d('shardseek_grammar_mask_seconds_total') / max(masks, 1):.1f} us/mask, {masks:.0f} masks), "
          f"not hidden {1e6 * d('shardseek_grammar_mask_wait_seconds_total') / steps:.0f} us/step")
EOF
