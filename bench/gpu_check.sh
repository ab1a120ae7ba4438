#!/usr/bin/env bash
# GPU check (issue 17 item 4, issue 28 item 5): what a lent CUDA GPU should confirm, in a few minutes.
#
#   bench/gpu_check.sh [--kit DIR]        on the GPU: results in
#                                         bench/results/gpu_{parity,quant_parity,engine,hellori,train,moe_layer}.json
#   bench/gpu_check.sh --dry [--kit DIR]  (or DRY=1) the same steps on CPU, small, into a scratch dir
#
# On the lent GPU machine (device tool: Python 3.12 with torch 2.11+cu130 and transformers 5.17;
# no network, no deepspeed, pydantic, hjson, dill, multiprocess there): here, once,
#     .venv/bin/python bench/gpu_kit.py        # -> .gpu_kit/ (27.4 MiB: 12 wheels + the embedded base)
# then ONE device `run`, then `give_back` (15 minutes of device time per task, its start included):
#     run(carry=[".gpu_kit"], timeout_s=540, command=
#       "timeout -k 5 500 bash bench/gpu_check.sh --kit .gpu_kit 2>&1 | tee $OUT/gpu_check.log; rc=${PIPESTATUS[0]};
#        cp bench/results/gpu_*.json $OUT/; tar czf $OUT/logs.tgz -C bench/out gpu_check; exit $rc")
# (8 files come back: the log, the 6 results, the step logs; the inner 500 s leaves time to copy them).
# Expected on an H100 (estimates, not yet measured there): kit install and checks ~0.5 min, parity
# of every supported type ~2 min, zero anchor ~0.5 min, HELLoRI ~1 min, train ~1 min, layer bench
# ~1.5 min: ~6.5 min. STEP_LIMIT (default 200 s on the GPU) ends a step that hangs (a collective
# that never returns), so the others still run.
#
#   1. parity (bench/gpu_parity.py): every supported architecture, world 1, EP 1 under NCCL,
#      converted model vs the HF + LoRA reference on the device; fp32 tight, bf16 per expert
#      layer; expert kernel forced to grouped (the GPU path) and to loop.
#   1b. quantized bases (bench/gpu_quant_parity.py): tiny FP8 deepseek_v3 / qwen3_moe and MXFP4
#      gpt_oss checkpoints loaded quantized, grouped and loop, fp32 tight and bf16 recorded,
#      against transformers' own dequantized model on the device (~1 min).
#   2. engine: (a) bench/gpu_engine_check.py: the trainer's model and engine, bf16 ZeRO-2,
#      moe.kernel=grouped, on a plan that leaves MoE layers 0 and 2 without expert adapters, so
#      they carry the ZeRO anchor; 10 steps, loss finite and falling, adapters changed.
#      (b) HELLoRI through launch/train.py (tiny_hellori.yaml, bf16, grouped): profiling, 10 dense
#      steps, then LoRI's stage 2 (moe_dist/adapters/lori.py sparsify_lori) for 10 more; the
#      stage-2 event at step 10, masks keeping ~10% of B, B zero outside them and trained inside.
#   3. the embedded default for 20 bf16 steps with activation checkpointing under
#      `deepspeed --num_gpus 1`; its summary.json copied, the loss must fall.
#   4. bench/moe_layer.py in bf16 on the device against transformers grouped_mm + PEFT.
# All steps run even if one fails; the script exits 1 if any failed.
#
# Assumptions:
#   - PYTHON (default: .venv/bin/python if there, else python3) has a CUDA torch and moe_dist's
#     dependencies (setup.py: deepspeed 0.19.8, transformers, peft, datasets, ...), or they come
#     from the kit: `--kit DIR` (bench/gpu_kit.py's folder; on the GPU `.gpu_kit` is used when
#     present and PYTHON has no deepspeed) installs its wheels offline (`pip install --no-index
#     --no-deps --target`, into GPU_KIT_SITE, default /tmp/gpu_kit_site; skipped when that holds
#     this kit already), puts them first on PYTHONPATH, checks their requirements against the
#     image (`gpu_kit.py --check-env`), and uses the kit's copy of the embedded base (cache/),
#     so nothing is pre-trained there. moe_dist itself is used from this tree through
#     PYTHONPATH. On a machine that can reach a package index, INSTALL=1 runs `$PYTHON -m pip
#     install -e .` first. The deepspeed launcher is run as `$PYTHON -m
#     deepspeed.launcher.runner`, so the `deepspeed` on PATH does not matter.
#   - Without a kit the embedded base model is built on first use into .cache/moe_dist (600
#     pre-training steps on the CPU cores: 112 s on 2 cores, up to 8 threads used).
#   - The dry mode hides any GPU (CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu, gloo), checks 2
#     architectures (olmoe; gpt_oss: biases, its own gate), runs 3 anchor steps and a 5-step
#     HELLoRI (stage 2 from step 3), trains 5 steps (micro-batch 4) of a 20-step pre-trained base
#     (built once into .cache/moe_dist, then reused; the kit's 600-step one with --kit), and times
#     one step at batch 1 x 32. It writes to GPU_CHECK_DIR (default bench/out/gpu_check_dry),
#     never to bench/results/, so CPU figures cannot pass for GPU ones.
#     GPU_CHECK_CACHE=dir: the embedded base's cache_dir for the dry run (tests share theirs).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY="${DRY:-0}"
KIT="${GPU_KIT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --kit) [ $# -ge 2 ] || { echo "gpu_check: --kit needs a folder" >&2; exit 2; }; KIT="$2"; shift ;;
        --kit=*) KIT="${1#--kit=}" ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (use --dry, --kit DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "$KIT" ] && [ "$DRY" != 1 ] && [ -f .gpu_kit/manifest.json ] && ! "$PYTHON" -c "import deepspeed" 2>/dev/null
then
    KIT=.gpu_kit  # the GPU machine's image: no deepspeed, a kit carried along
fi
if [ -n "$KIT" ]; then
    [ -d "$KIT" ] || { echo "gpu_check: no kit folder $KIT (python bench/gpu_kit.py makes one)" >&2; exit 2; }
    KIT="$(cd "$KIT" && pwd)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
    SCRATCH="${GPU_CHECK_DIR:-$ROOT/bench/out/gpu_check_dry}"
    RESULTS="$SCRATCH/results"
    WORK="$SCRATCH"
    DEVICE=cpu
    CACHE_DIR="${GPU_CHECK_CACHE:-$ROOT/.cache/moe_dist}" PRETRAIN=20
    STEP_LIMIT="${STEP_LIMIT:-600}"
    PARITY_ARGS=(--archs olmoe,gpt_oss)
    QUANT_ARGS=(--archs deepseek_v3)
    ENGINE_ARGS=(--steps 3 --micro-batch 4 --seq 64)
    HELLORI_ARGS=(hellora.profile_steps=2 hellori.stage1_steps=3 train.steps=5 train.micro_batch=4)
    TRAIN_ARGS=(train.steps=5 train.warmup_steps=1 train.lr=0.01 train.micro_batch=4 train.log_every=1)
    LAYER_ARGS=(--warmup 0 --rounds 1 --steps 1 --variants moe_dist_all_experts --batch 1 --seq 32)
else
    RESULTS="$ROOT/bench/results"
    WORK="$ROOT/bench/out/gpu_check"
    DEVICE=cuda
    CACHE_DIR="$ROOT/.cache/moe_dist" PRETRAIN=-1
    STEP_LIMIT="${STEP_LIMIT:-200}"
    PARITY_ARGS=()
    QUANT_ARGS=()
    ENGINE_ARGS=(--steps 10)
    HELLORI_ARGS=(hellora.profile_steps=4 hellori.stage1_steps=10 train.steps=20)
    TRAIN_ARGS=(train.steps=20)
    # (not the CPU-only comparison of the fused expert MLP with the loop kernel)
    LAYER_ARGS=(--rounds 11 --steps 5
                --variants moe_dist_all_experts,moe_dist_hot10,moe_dist_all_experts_split_gate_up,moe_dist_attention_only)
fi
if [ -n "$KIT" ]; then CACHE_DIR="$KIT/cache" PRETRAIN=-1; fi  # the kit's 600-step base: no pre-training here
mkdir -p "$RESULTS" "$WORK"

if [ "${INSTALL:-0}" = 1 ]; then
    "$PYTHON" -m pip install -e . || exit 1
fi
if [ -n "$KIT" ]; then  # the kit's wheels, offline, ahead of the image's packages
    "$PYTHON" bench/gpu_kit.py --list --kit "$KIT" || exit 1
    SITE="${GPU_KIT_SITE:-/tmp/gpu_kit_site}"
    if ! cmp -s "$KIT/manifest.json" "$SITE/.gpu_kit_manifest.json"; then
        t0=$SECONDS
        rm -rf "$SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$KIT"/wheels/*.whl || exit 1
        cp "$KIT/manifest.json" "$SITE/.gpu_kit_manifest.json"
        echo "gpu_check: kit installed into $SITE in $((SECONDS - t0)) s"
    fi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    "$PYTHON" bench/gpu_kit.py --check-env --kit "$KIT" || exit 1
fi
"$PYTHON" - "$DEVICE" <<'EOF' || exit 1
import sys
import torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (bench/gpu_check.sh --dry runs on CPU)")
try:
    import datasets, deepspeed, peft, transformers
except ImportError as exc:
    sys.exit(f"gpu_check: {exc}; install moe_dist's dependencies (INSTALL=1 runs pip install -e .; "
             "or bring them: python bench/gpu_kit.py, then --kit .gpu_kit)")
gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, datasets {datasets.__version__}; GPU {gpu}")
EOF

failed=()
step() {  # step NAME LOG CMD...: run, log to LOG, note a failure
    local name="$1" log="$2"
    shift 2
    local t0=$SECONDS
    echo "== gpu_check: $name"
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "== gpu_check: $name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || failed+=("$name")
}
limit() { timeout -k 10 "$STEP_LIMIT" "$@"; }  # a hung step (a collective that never returns) ends here
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
launch() {  # launch OUT ARGS...: launch/train.py on one device into a fresh OUT (an old checkpoint would be resumed)
    local out="$1"
    shift
    rm -rf "$out"
    limit "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$(free_port)" launch/train.py "$@" \
        data.eval= "export.formats=[]" "output_dir=$out" "cache_dir=$CACHE_DIR" "embedded_pretrain_steps=$PRETRAIN"
}

# 1. parity
step parity "$WORK/parity.log" \
    limit "$PYTHON" bench/gpu_parity.py --device "$DEVICE" "${PARITY_ARGS[@]}" --out "$RESULTS/gpu_parity.json"

# 1b. quantized bases (FP8 block, MXFP4) kept quantized: grouped and loop vs transformers' dequantized model
step quant_parity "$WORK/quant_parity.log" \
    limit "$PYTHON" bench/gpu_quant_parity.py --device "$DEVICE" "${QUANT_ARGS[@]}" --out "$RESULTS/gpu_quant_parity.json"

# 2a. the ZeRO anchor under the bf16 ZeRO-2 engine
step zero_anchor "$WORK/zero_anchor.log" \
    limit "$PYTHON" bench/gpu_engine_check.py --device "$DEVICE" "${ENGINE_ARGS[@]}" --cache-dir "$CACHE_DIR" \
    --pretrain-steps "$PRETRAIN" --out "$RESULTS/gpu_engine.json"

# 2b. HELLoRI's stage 2 (LoRI masks) in bf16
hellori() {
    local out="$WORK/hellori"
    launch "$out" --recipe launch/recipes/tiny_hellori.yaml train.precision=bf16 moe.kernel=grouped \
        train.warmup_steps=1 train.log_every=1 checkpoint.every=0 "${HELLORI_ARGS[@]}" || return
    "$PYTHON" - "$out" "$RESULTS/gpu_hellori.json" <<'EOF'
"""Stage 2 began at hellori.stage1_steps; the final checkpoint's expert B tensors are zero
outside their LoRI masks, the masks keep about 1 - sparsity of B, and B was trained inside them."""
import json, math, sys
from pathlib import Path
from safetensors.torch import load_file
out, dest = Path(sys.argv[1]), Path(sys.argv[2])
s = json.loads((out / "summary.json").read_text())
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
events = [r for r in rows if "LoRI stage 2" in str(r.get("event", ""))]
losses = [r["loss"] for r in rows if "loss" in r]
t = {}
for f in Path(s["checkpoint"]).glob("adapters-rank*.safetensors"):
    t.update(load_file(f))
B = {k: v for k, v in t.items() if ".experts." in k and k.endswith(".lora_B")}
n = sum(b.numel() for b in B.values())
masks = {k: t.get(k + ".mask") for k in B}
kept = sum(int(m.sum()) for m in masks.values() if m is not None) / max(n, 1)
outside = sum(int(((b != 0) & (masks[k] == 0)).sum()) for k, b in B.items() if masks[k] is not None)
inside = sum(int((b != 0).sum()) for b in B.values())
problems = []
if len(events) != 1:
    problems.append(f"{len(events)} 'LoRI stage 2' events in metrics.jsonl, want 1")
if not losses or not all(math.isfinite(x) for x in losses):
    problems.append(f"losses {losses}")
if not B or any(m is None for m in masks.values()):
    problems.append(f"{len(B)} expert B tensors, {sum(m is None for m in masks.values())} without a mask")
elif not 0 < kept <= 0.12 or outside or not inside:
    problems.append(f"masks keep {kept:.3f} of B (want ~0.10), {outside} nonzero outside them, {inside} inside")
report = dict(summary=s, stage2_event=events[0] if events else None, losses=losses, expert_B_entries=n,
              mask_kept=kept, nonzero_outside_mask=outside, nonzero_inside_mask=inside, problems=problems,
              passed=not problems)
dest.write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check: hellori {s['steps']} steps, stage 2 {events[0]['step'] if events else 'MISSING'}: masks keep "
      f"{kept:.3f} of {n} expert B entries, {outside} nonzero outside, {inside} inside; loss {s['first_loss']} -> "
      f"{s['final_loss']}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
sys.exit(1 if problems else 0)
EOF
}
step hellori "$WORK/hellori.log" hellori

# 3. bf16 training with activation checkpointing
train() {
    local out="$WORK/train"
    launch "$out" --recipe launch/recipes/tiny_lora.yaml train.precision=bf16 train.activation_checkpointing=true \
        checkpoint.every=0 "${TRAIN_ARGS[@]}" || return
    cp "$out/summary.json" "$RESULTS/gpu_train.json" || return
    "$PYTHON" - "$RESULTS/gpu_train.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
first, final = s["first_loss"], s["final_loss"]
fell = first is not None and final is not None and final < first
print(f"gpu_check: {s['steps']} steps, loss {first} -> {final} (mean of the last 5): "
      f"{'fell' if fell else 'DID NOT FALL'}; activation checkpointing {s.get('activation_checkpointing')}, "
      f"skipped steps {s.get('skipped_steps')}, step peak memory {s.get('step_peak_memory_gib')} GiB")
sys.exit(0 if fell and s.get("activation_checkpointing") else 1)
EOF
}
step train "$WORK/train.log" train

# 4. the expert layer in bf16 against transformers grouped_mm + PEFT
step moe_layer "$WORK/moe_layer.log" \
    limit "$PYTHON" bench/moe_layer.py --dtype bf16 --device "$DEVICE" "${LAYER_ARGS[@]}" \
    --out "$RESULTS/gpu_moe_layer.json"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $WORK)"
    exit 1
fi
echo "gpu_check: all passed; results in $RESULTS"
