#!/usr/bin/env bash
# Train the built-in model's variants on one GPU in about 7 minutes, and measure each.
#
#   1. one VAE, shared by all variants                          (VAE_MINUTES, default 1.0)
#   2. the UNet/text-encoder variants, in parallel on the GPU   (UNET_MINUTES, default 4.5)
#      each followed by benchmarks/quality.py                   (QUALITY_N + QUALITY_N captions)
#   3. into $OUT (at most 8 files, each < 16 MB):
#        results.json        every variant's config, steps, minutes and quality figures, the ranking
#        log.txt             timeline, GPU use, each variant's quality tables and log tail
#        common.tar.gz       vae/ and tokenizer/ (the same for every variant) + the VAE's log
#        <variant>.tar.gz    model_index.json unet/ text_encoder/ scheduler/ training.json quality.json train/log.jsonl
#      A variant's pipeline folder is its tar plus common.tar.gz:
#        mkdir -p runs/t0_joint && tar xzf t0_joint.tar.gz -C runs/t0_joint && tar xzf common.tar.gz -C runs/t0_joint
#
# Usage, from the repository root, with torch, diffusers and transformers importable:
#   OUT=/some/dir bash scripts/gpu_train.sh
# A dry run on the CPU in about a minute (tiny budgets, same code paths):
#   SDLENS_GPU_DRY=1 OUT=/tmp/gpu_dry bash scripts/gpu_train.sh
# Every budget can be overridden by its environment variable (see the defaults below).
set -uo pipefail

# shellcheck source=scripts/_gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_gpu_env.sh"   # REPO, OUT, PY, offline env

if [[ "${SDLENS_GPU_DRY:-0}" == 1 ]]; then  # seconds-long budgets on the CPU: does it run end to end?
  : "${DEVICE:=cpu}" "${VAE_MINUTES:=0.05}" "${UNET_MINUTES:=0.1}" "${VAE_BATCH:=8}" "${UNET_BATCH:=8}"
  : "${QUALITY_N:=2}" "${THREADS:=1}" "${LOG_EVERY:=5}"
fi
: "${DEVICE:=cuda}" "${VAE_MINUTES:=1.0}" "${UNET_MINUTES:=4.5}" "${VAE_BATCH:=128}" "${UNET_BATCH:=256}"
: "${QUALITY_N:=40}" "${THREADS:=4}" "${LOG_EVERY:=200}" "${SEED:=0}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

# The variants: name, then train-tiny options. All share the VAE, the UNet (64,128,128) x 2 layers per
# block and the 64-wide text encoder; they differ in how much the text encoder can mix the tokens.
VARIANTS=(
  "t0_joint  --text-mode joint  --text-layers 0"   # no text layers: each slot holds its own token only
  "t0_frozen --text-mode frozen --text-layers 0"   # the same with fixed random token vectors
  "t1_joint  --text-mode joint  --text-layers 1"   # one causal layer
  "t2_joint  --text-mode joint  --text-layers 2"   # the 32-px CPU prototype's text encoder, for reference
)

WORK="${WORK:-$(mktemp -d /tmp/sdlens_gpu.XXXXXX)}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
: > "$LOG"
stamp() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
minutes_to_s() { "$PY" -c "import math,sys; print(math.ceil(float(sys.argv[1]) * 60))" "$1"; }

stamp "repo $REPO, work $WORK, out $OUT, device $DEVICE"
stamp "budgets: VAE ${VAE_MINUTES} min x batch $VAE_BATCH, UNet ${UNET_MINUTES} min x batch $UNET_BATCH, quality $QUALITY_N+$QUALITY_N"
# Preflight: everything the run imports, so that a missing package costs seconds, not the GPU lease.
if ! "$PY" - "$DEVICE" >> "$LOG" 2>&1 <<'EOF'
import sys
import einops, numpy, PIL, safetensors, tqdm, tokenizers, torch, diffusers, transformers  # noqa: F401
import sdlens, sdlens.models.train, sdlens.world  # noqa: F401
from sdlens.tokens import load_clip_tokenizer
load_clip_tokenizer()
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
if sys.argv[1].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("DEVICE is cuda but torch sees no GPU")
EOF
then
  stamp "preflight failed:"; tail -n 20 "$LOG"
  echo '{"error": "preflight failed (imports or GPU); see log.txt"}' > "$OUT/results.json"
  exit 1
fi
tail -n 1 "$LOG"

GPU_MON=""
if command -v nvidia-smi > /dev/null && [[ "$DEVICE" == cuda* ]]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 20 > "$WORK/gpu_use.csv" 2>&1 &
  GPU_MON=$!
fi

# --- 1. the shared VAE ---------------------------------------------------------------------------
VAE_S=$(minutes_to_s "$VAE_MINUTES")
stamp "VAE: training"
timeout $((VAE_S + 240)) "$PY" -m sdlens.cli train-tiny --out "$WORK/vae" --stages vae \
  --vae-minutes "$VAE_MINUTES" --vae-batch "$VAE_BATCH" --device "$DEVICE" --seed "$SEED" \
  --no-progress --log-every "$LOG_EVERY" > "$WORK/vae.log" 2>&1
VAE_RC=$?
stamp "VAE: exit $VAE_RC"
if [[ $VAE_RC != 0 ]]; then
  tail -n 40 "$WORK/vae.log" | tee -a "$LOG"
  echo "{\"error\": \"VAE training failed with exit $VAE_RC; see log.txt\"}" > "$OUT/results.json"
  [[ -n "$GPU_MON" ]] && kill "$GPU_MON"
  exit 1
fi

# How well does the VAE alone reproduce the world? (analyzer adherence of reconstructions; in the background)
"$PY" - "$WORK/vae" "$DEVICE" > "$WORK/vae_check.json" 2> "$WORK/vae_check.log" <<'EOF' &
import json, sys
import numpy as np, torch
from sdlens.models.train import find_vae
from sdlens.world import sample_batch, score
from diffusers import AutoencoderKL
folder, device = sys.argv[1], sys.argv[2]
vae = AutoencoderKL.from_pretrained(find_vae(folder), local_files_only=True).to(device).eval()
g = torch.Generator(device).manual_seed(99)
images, captions, _, _ = sample_batch(200, generator=g, device=device)
with torch.no_grad():
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
mse = float(((recon - images) ** 2).mean())
ok = [score(r, c)["all"] for r, c in zip(recon.float().cpu(), captions)]
print(json.dumps({"reconstruction_adherence": float(np.mean(ok)), "mse": mse, "n": len(ok),
                  "scaling_factor": vae.config.scaling_factor}))
EOF
VAE_CHECK=$!

# --- 2. the variants, in parallel ----------------------------------------------------------------
UNET_S=$(minutes_to_s "$UNET_MINUTES")
NAMES=()
PIDS=()
for spec in "${VARIANTS[@]}"; do
  read -r name options <<< "$spec"
  NAMES+=("$name")
  (
    # shellcheck disable=SC2086  # options is a list of words on purpose
    timeout $((UNET_S + 300)) "$PY" -m sdlens.cli train-tiny --out "$WORK/$name" --vae-from "$WORK/vae" \
      --unet-minutes "$UNET_MINUTES" --unet-batch "$UNET_BATCH" --device "$DEVICE" --seed "$SEED" \
      --no-progress --log-every "$LOG_EVERY" $options || exit 10
    echo "=== quality"
    timeout 400 "$PY" "$REPO/benchmarks/quality.py" --model "$WORK/$name" --n "$QUALITY_N" \
      --batch $((2 * QUALITY_N)) --device "$DEVICE" --json "$WORK/$name/quality.json" || exit 20
  ) > "$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  stamp "$name: started (pid $!): $options"
done
declare -A RCS
for i in "${!NAMES[@]}"; do
  wait "${PIDS[$i]}"
  RCS[${NAMES[$i]}]=$?
  stamp "${NAMES[$i]}: exit ${RCS[${NAMES[$i]}]} (10: training failed, 20: quality failed)"
done
wait "$VAE_CHECK"
[[ -n "$GPU_MON" ]] && kill "$GPU_MON"

# --- 3. collect ----------------------------------------------------------------------------------
COMMON_FROM=""
for name in "${NAMES[@]}"; do
  dir="$WORK/$name"
  [[ -f "$dir/model_index.json" ]] || continue
  [[ -z "$COMMON_FROM" ]] && COMMON_FROM="$dir"
  files=(model_index.json unet text_encoder scheduler training.json train/log.jsonl train/config.json)
  [[ -f "$dir/quality.json" ]] && files+=(quality.json)
  tar -czf "$OUT/$name.tar.gz" -C "$dir" "${files[@]}"
done
if [[ -n "$COMMON_FROM" ]]; then
  cp "$WORK/vae/train/log.jsonl" "$WORK/vae_log.jsonl"
  cp "$WORK/vae/training.json" "$WORK/vae_training.json"
  tar -czf "$OUT/common.tar.gz" -C "$COMMON_FROM" vae tokenizer -C "$WORK" vae_log.jsonl vae_training.json
fi

RC_JSON="{"
for name in "${NAMES[@]}"; do RC_JSON+="\"$name\": ${RCS[$name]}, "; done
RC_JSON="${RC_JSON%, }}"
SPECS_JSON=$(printf '%s\n' "${VARIANTS[@]}" | "$PY" -c "import json,sys; print(json.dumps([l.split(None, 1) for l in sys.stdin.read().splitlines()]))")

"$PY" - "$WORK" "$OUT" "$RC_JSON" "$SPECS_JSON" "$SECONDS" >> "$LOG" 2>&1 <<'EOF'
import hashlib, json, math, sys
from pathlib import Path

work, out, rcs, specs, seconds = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])

def load(p):
    try:
        return json.loads(Path(p).read_text())
    except Exception as e:  # a missing or broken file is reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}

def sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] if Path(p).exists() else None

results = {"seconds_total": seconds, "vae": load(work / "vae" / "training.json"), "vae_check": load(work / "vae_check.json"),
           "variants": {}, "files": {}}
for name, options in specs:
    d = work / name
    training = load(d / "training.json")
    quality = load(d / "quality.json")
    summary = quality.get("summary", quality)
    results["variants"][name] = {
        "options": options,
        "exit": rcs.get(name),
        "unet": training.get("stages", {}).get("unet", training),
        "config": training.get("config"),
        "quality": summary,
        "vae_sha": sha(d / "vae" / "diffusion_pytorch_model.safetensors"),
    }

def rank_key(item):
    t = item[1]["quality"].get("targets") or {}
    met = sum(v["met"] for v in t.values())
    closeness = sum(min(1.0, v["value"] / v["goal"]) for v in t.values() if not math.isnan(v["value"]))
    return (met, closeness)

ranking = sorted(results["variants"].items(), key=rank_key, reverse=True)
results["ranking"] = [name for name, _ in ranking]
results["best"] = ranking[0][0] if ranking else None
for f in sorted(out.iterdir()):
    results["files"][f.name] = f.stat().st_size
too_big = [n for n, s in results["files"].items() if s >= 16_000_000]
results["warnings"] = [f"{n} is {results['files'][n] / 1e6:.1f} MB, over the 16 MB limit" for n in too_big]
if len({v["vae_sha"] for v in results["variants"].values() if v["vae_sha"]}) > 1:
    results["warnings"].append("the variants' exported VAEs differ: common.tar.gz holds the first one's")
(out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

print("\n=== ranking (targets met, then closeness):", ", ".join(results["ranking"]))
for name, v in results["variants"].items():
    q = v["quality"]
    u = v["unet"]
    print(f"\n=== {name} ({' '.join(v['options'].split())}): exit {v['exit']}, unet steps {u.get('steps')} in {u.get('minutes')} min")
    if "adherence" in q:
        loc = q["localisation"]
        print(f"adherence single {q['adherence']['single']:.1%}, two {q['adherence']['two']:.1%}; "
              f"shape IoU single {loc['single']['shape']['iou']:.2f}; peak on object: first colour "
              f"{loc['first']['color']['peak']:.0%}, first shape {loc['first']['shape']['peak']:.0%}, "
              f"second colour {loc['second']['color']['peak']:.0%}, second shape {loc['second']['shape']['peak']:.0%}; "
              f"padding mass {q['slot_mass']['two']['pad']:.0%}")
print("\nVAE check:", json.dumps(results["vae_check"]))
print("files:", json.dumps(results["files"]))
for w in results["warnings"]:
    print("WARNING:", w)
EOF

{
  echo; echo "=== GPU use (every 20 s)"; cat "$WORK/gpu_use.csv" 2>/dev/null
  echo; echo "=== VAE log tail"; tail -n 15 "$WORK/vae.log"
  for name in "${NAMES[@]}"; do
    echo; echo "=== $name log (training tail, quality tables)"
    grep -v "Warning\|warn(\|accelerate\|^\`\`\`\|^\.$\|torchvision" "$WORK/$name.log" | tail -n 60
  done
} >> "$LOG"
stamp "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
ls -la "$OUT" | tee -a "$LOG"
