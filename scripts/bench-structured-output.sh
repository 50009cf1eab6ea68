#!/bin/bash
# Throughput with and without a JSON schema at 8 concurrent requests, and the grammar mask cost
# per step, on `shardseek up` (tiny generated model, 2 expert shards).
set -e
cd /work/wt/api
B=./target/debug/shardseek
$B up --model /tmp/api-tiny --expert-shards 2 --port 18431 > /tmp/api-up.log 2>&1 &
UP=$!
for i in $(seq 60); do grep -q "shardseek up:" /tmp/api-up.log && break; sleep 1; done
M=$(ps -eo args | grep -- "--role attention" | grep -v grep | grep -o "\-\-listen [0-9.:]*" | cut -d' ' -f2)
snap(){ curl -s $M/metrics | grep -E "^shardseek_(grammar|engine_step|generation_tokens_total)"; }
run(){ $B bench serve --url http://127.0.0.1:18431 --requests 32 --concurrency 8 --input-len 64 --output-len 96 --vocab 200 --json "$@"; }
run > /dev/null  # warm-up
for round in 1 2; do
  snap > /tmp/api-m-a$round.txt; run > /tmp/api-bench-plain$round.json
  snap > /tmp/api-m-b$round.txt; run --json-schema /tmp/api-schema.json > /tmp/api-bench-schema$round.json
  snap > /tmp/api-m-c$round.txt
done
kill $UP
