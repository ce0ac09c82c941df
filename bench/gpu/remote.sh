#!/usr/bin/env bash
# Run THERE (the device machine), from the repo root, as the command of a device call that carries
# .carry/whl, .carry/data and one GGUF piece (see bench/gpu/README.md):
#   bash bench/gpu/remote.sh STAGE...
# Stages: setup (wheels; collects GGUF pieces; converts the model once all have arrived), tests,
# kernel, step, profile, smollm2, issue11, distill, selfdistill, train. Results land in $OUT (they come back to the CPU machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
STATE=/tmp/treespec
MODEL=$STATE/SmolLM2-135M-Instruct   # the folder name picks the shipped drafters
mkdir -p "$STATE/parts" "${OUT:=/tmp/out}"
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
PY=python3
log() { echo "[remote $(date +%H:%M:%S)] $*"; }

setup() {
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/whl/*.whl || return 1
  for p in .carry/gguf.part*; do [ -f "$p" ] && cp -n "$p" "$STATE/parts/"; done
  [ -f .carry/gguf.sha256 ] && cp .carry/gguf.sha256 "$STATE/"
  log "GGUF pieces here: $(ls "$STATE/parts" | tr '\n' ' ')"
  if [ ! -f "$MODEL/.complete" ] && [ -f "$STATE/gguf.sha256" ]; then
    cat "$STATE"/parts/gguf.part* > "$STATE/model.gguf"
    if [ "$(sha256sum "$STATE/model.gguf" | cut -d' ' -f1)" = "$(cat "$STATE/gguf.sha256")" ]; then
      $PY -m server.models.fetch --gguf "$STATE/model.gguf" --dest "$MODEL" && log "model ready at $MODEL"
    else
      log "model incomplete: carry the remaining pieces"
    fi
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
}

need_model() { [ -f "$MODEL/.complete" ] || { log "stage $1 needs the model (all GGUF pieces)"; return 1; }; }

tests() { $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" | tail -30; }
kernel() { $PY -m bench.kernel_attn --device cuda --out "$OUT/kernel_attn.json" 2>&1 | tail -30; }
step() {
  $PY -m bench.step_latency --device cuda --batches 1 16 --out "$OUT/step_latency.json" 2>&1 | tail -30
}
smollm2() {
  need_model smollm2 || return 1
  # SMOLLM2_PER_CATEGORY questions of each MT-bench category (unset: all 80), to fit a 10-minute call
  for c in ${SMOLLM2_CONCURRENCY:-1 8 32}; do
    # shellcheck disable=SC2086
    $PY -m server.cli bench --model "$MODEL" --device cuda --questions .carry/data/mt_bench.jsonl \
      ${SMOLLM2_PER_CATEGORY:+--per-category $SMOLLM2_PER_CATEGORY} --concurrency $c --max-new-tokens 128 --no-hf \
      --compare ${SMOLLM2_DRAFTERS:-lookup eagle gumiho hybrid} --budgets ${SMOLLM2_BUDGETS:-16 32 64} \
      --out "$OUT/smollm2_compare_c$c.json" 2>&1 | tail -14
  done
}
profile() {   # where a served step's time goes, per drafter (torch.profiler; bench/profile_step.py)
  need_model profile || return 1
  for c in ${PROFILE_CONCURRENCY:-1 8}; do
    $PY -m bench.profile_step --model "$MODEL" --device cuda --questions .carry/data/mt_bench.jsonl \
      --drafters ${PROFILE_DRAFTERS:-none lookup eagle gumiho hybrid} --concurrency "$c" --budget 32 \
      --out "$OUT/profile_c$c.json" 2>&1 | grep -v INFO | tail -60
  done
  $PY -m bench.profile_step --model "$MODEL" --device cuda --questions .carry/data/mt_bench.jsonl \
    --drafters none --cuda-graphs false --out "$OUT/profile_eager_c1.json" 2>&1 | grep -v INFO | tail -14
}
issue11() {   # the newer drafters at batch 1 (Medusa dynamic vs static, draft model, GSD merge on/off)
  need_model issue11 || return 1
  $PY -m server.cli bench --model "$MODEL" --device cuda --questions .carry/data/mt_bench.jsonl \
    --concurrency 1 --max-new-tokens 128 --no-hf --budgets 16 --compare eagle medusa 'medusa[medusa.tree=static]' \
    draft-model gsd 'gsd[gsd.repeat_threshold=-1]' --out "$OUT/smollm2_issue11_c1.json" 2>&1 | tail -12
}
distill() {
  need_model distill || return 1
  gunzip -c .carry/data/train_prompts.jsonl.gz > "$STATE/train_prompts.jsonl"
  $PY -m server.cli distill --model "$MODEL" --device cuda --data "$STATE/train_prompts.jsonl" \
    --out drafters/data/smollm2-distill --shard-size 128 --max-num-seqs 256 --kv-cache-gib 16 \
    --max-minutes "${DISTILL_MINUTES:-8}" 2>&1 | tail -12
  tar -czf "$OUT/distill_shards.tgz" drafters/data/smollm2-distill
}
selfdistill() {   # general-domain data: write more self-prompts (seed 100: the CPU files use seeds 0-4), answer them
  need_model selfdistill || return 1
  local engine="--model $MODEL --device cuda --max-num-seqs 256 --kv-cache-gib 16"
  # shellcheck disable=SC2086
  $PY -m server.cli self-prompts $engine --out drafters/data/smollm2-self-prompts-gpu.jsonl --seed 100 \
    --num "${SELF_PROMPTS:-8192}" --in-flight 256 --avoid "$(ls drafters/data/smollm2-self-prompts*.jsonl | grep -v gpu | paste -sd,)" \
    2>&1 | tail -4
  # shellcheck disable=SC2086
  $PY -m server.cli distill $engine --data drafters/data/smollm2-self-prompts-gpu.jsonl \
    --out drafters/data/smollm2-distill-self-gpu --shard-size 128 --max-minutes "${DISTILL_MINUTES:-4}" 2>&1 | tail -6
  tar -czf "$OUT/selfdistill.tgz" drafters/data/smollm2-self-prompts-gpu.jsonl drafters/data/smollm2-distill-self-gpu
}
train_data() {   # every finished distillation folder, comma-joined (train-drafter --data)
  local folders=drafters/data/smollm2-distill extra
  for extra in drafters/data/smollm2-distill-*; do
    [ -f "$extra/meta.json" ] && folders="$folders,$extra"
  done
  echo "$folders"
}
train_flags() {   # method-specific flags: warm start from the shipped checkpoint
  case "$1" in
    eagle) echo "--init drafters/checkpoints/smollm2-eagle --unroll 3 ${EAGLE_LAYERS:+--eagle-layers $EAGLE_LAYERS} ${EAGLE_INTERMEDIATE:+--eagle-intermediate $EAGLE_INTERMEDIATE} ${AUX_LAYERS:+--aux-layers $AUX_LAYERS} --save-dtype float16" ;;
    gumiho) echo "--init drafters/checkpoints/smollm2-gumiho --mlp-num 5 --mlp-res-blocks 1 --save-dtype float16" ;;
    medusa) echo "--init drafters/checkpoints/smollm2-medusa --medusa-head trained --head-vocab 2048 --medusa-heads 4 --lr 2e-3" ;;
    draft-model) echo "--init drafters/checkpoints/smollm2-draft --draft-init fresh" ;;
  esac
}
train() {   # TRAIN_METHODS (default eagle) share one feature folder (another with AUX_LAYERS); TRAIN_MINUTES each
  need_model train || return 1
  for method in ${TRAIN_METHODS:-eagle}; do
    # shellcheck disable=SC2046
    $PY -m server.cli train-drafter --model "$MODEL" --data "$(train_data)" --device cuda --amp \
      --method "$method" $(train_flags "$method") --work "$STATE/features${AUX_LAYERS:+-aux}" \
      --out "$STATE/${method}_out" --max-minutes "${TRAIN_MINUTES:-8}" 2>&1 | tail -12
    tar -czf "$OUT/${method}_checkpoint.tgz" -C "$STATE" "${method}_out"
  done
}

for stage in "$@"; do
  log "stage $stage"
  "$stage" || log "stage $stage FAILED"
done
