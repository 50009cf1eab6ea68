"""`shardseek generate` on every case of the reference fixtures, compared with expected.json.

Usage: fixture_compare.py SHARDSEEK_BINARY FIXTURES_DIR [--device cuda]
The rules are the fixtures' README's (and worker/tests/model/fixtures.rs's): follow the greedy
steps while the tokens agree; each log-prob (echoed prompt and generated) within TOL of the
float64 reference; a different token only where the reference's top-1 margin is below TOL.
Runs with the exact f32 KV cache. Exits 1 on any disagreement.
"""
import json
import os
import subprocess
import sys

TOL = 2e-3


def main():
    binary, fixtures = sys.argv[1], sys.argv[2]
    device = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--device" else "cuda"
    bad = 0
    for name in ("open-bf16", "open-fp8"):
        d = os.path.join(fixtures, name)
        exp = json.load(open(os.path.join(d, "expected.json")))
        worst, compared = 0.0, 0
        for ci, case in enumerate(exp["cases"]):
            steps = case["steps"]
            cmd = [binary, "generate", "--model", d, "--device", device,
                   "--prompt-tokens", ",".join(map(str, case["prompt"])),
                   "--max-tokens", str(len(steps)), "--echo", "--logprobs", "5",
                   "--ignore-eos", "--kv-cache-dtype", "f32", "--json"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{name} case {ci}: generate failed:\n{res.stderr[-2000:]}")
                bad += 1
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            for i, (e, o) in enumerate(zip(case["echo_logprobs"], out["prompt_logprobs"])):
                if i == 0:
                    continue
                diff = abs(e - o)
                worst, compared = max(worst, diff), compared + 1
                if diff >= TOL:
                    print(f"{name} case {ci} echo {i}: ours {o} reference {e}")
                    bad += 1
            for si, st in enumerate(steps):
                if out["tokens"][si] != st["token"]:
                    if st["margin"] >= TOL:
                        print(f"{name} case {ci} step {si}: token {out['tokens'][si]} vs {st['token']} (margin {st['margin']})")
                        bad += 1
                    break
                diff = abs(out["logprobs"][si] - st["logprob"])
                worst, compared = max(worst, diff), compared + 1
                if diff >= TOL:
                    print(f"{name} case {ci} step {si}: logprob {out['logprobs'][si]} vs {st['logprob']}")
                    bad += 1
        print(f"{name}: generate --device {device}: {compared} log-probs compared, "
              f"largest |difference| {worst:.2e} (tolerance {TOL})")
    sys.exit(1 if bad else 0)


main()
