#!/usr/bin/env bash
# CPU speed of setar-engine beside HF transformers, in one run, same checkpoint, threads, batch.
#   PYTHON=/path/to/python-with-torch-transformers scripts/bench-cpu.sh
# Env: THREADS (default: all cores), BATCH (32), PROMPTS (256), ROUNDS (2: ours, HF, ours, HF).
# Writes bench-results/cpu.json and prints a Markdown table with medians and ratios.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
BATCH=${BATCH:-32}
PROMPTS=${PROMPTS:-256}
ROUNDS=${ROUNDS:-2}
TARGET=${CARGO_TARGET_DIR:-target}
model=$(mktemp -d)
trap 'rm -rf "$model"' EXIT
cargo build --release --quiet
"$TARGET"/release/setar-engine init-random --preset vit-b-16 --out "$model" --quiet
mkdir -p bench-results
ours=(); hf=()
for r in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=$THREADS SETAR_BENCH_MODEL=$model SETAR_BENCH_BATCH=$BATCH SETAR_BENCH_PROMPTS=$PROMPTS \
    cargo bench --quiet --bench towers -- --noplot >/dev/null 2>&1
  ours+=("$($PYTHON - "$BATCH" "$PROMPTS" "$TARGET" <<'PY'
import json, sys
b, p, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
est = lambda path: json.load(open(f"{target}/criterion/{path}/new/estimates.json"))["median"]["point_estimate"] / 1e9
print(json.dumps({"image_img_per_s": b / est(f"image_tower/global_b{b}"),
                  "image_local_img_per_s": b / est(f"image_tower/global_and_local_b{b}"),
                  "text_prompts_per_s": p / est(f"text_tower/prompts{p}_len16")}))
PY
)")
  hf+=("$(OMP_NUM_THREADS=$THREADS $PYTHON scripts/bench_hf_cpu.py --model "$model" --threads "$THREADS" --batch "$BATCH" --prompts "$PROMPTS")")
done
$PYTHON - "$THREADS" "$BATCH" "$PROMPTS" "${#ours[@]}" "${ours[@]}" "${hf[@]}" <<'PY'
import json, statistics, sys, platform, subprocess
threads, batch, prompts, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ours = [json.loads(x) for x in sys.argv[5:5 + n]]
hf = [json.loads(x) for x in sys.argv[5 + n:]]
med = lambda rows, k: statistics.median(r[k] for r in rows)
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
res = {"cpu": cpu, "threads": int(threads), "batch": int(batch), "prompts": int(prompts), "peer": hf[0]["peer"],
       "ours": ours, "hf": hf,
       "image_ratio": med(ours, "image_img_per_s") / med(hf, "image_img_per_s"),
       "text_ratio": med(ours, "text_prompts_per_s") / med(hf, "text_prompts_per_s")}
json.dump(res, open("bench-results/cpu.json", "w"), indent=1)
print(f"| tower (ViT-B/16 shapes, {cpu}, {threads} threads) | setar-engine | {hf[0]['peer']} | ratio |")
print("|---|---|---|---|")
print(f"| image, batch {batch}, global features | {med(ours, 'image_img_per_s'):.2f} img/s | {med(hf, 'image_img_per_s'):.2f} img/s | {res['image_ratio']:.2f}x |")
print(f"| image, batch {batch}, global + local features | {med(ours, 'image_local_img_per_s'):.2f} img/s | – | – |")
print(f"| text, {prompts} prompts of 16 tokens | {med(ours, 'text_prompts_per_s'):.1f} prompts/s | {med(hf, 'text_prompts_per_s'):.1f} prompts/s | {res['text_ratio']:.2f}x |")
print(f"(medians over {n} rounds; per-round values in bench-results/cpu.json)")
PY
