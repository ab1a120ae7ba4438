#!/usr/bin/env bash
# GPU check (issue 17 item 4): what a lent CUDA GPU should confirm, in a few minutes.
#
#   bench/gpu_check.sh          on the GPU: results in bench/results/gpu_{parity,train,moe_layer}.json
#   bench/gpu_check.sh --dry    (or DRY=1) the same three steps on CPU, small, into a scratch dir
#
#   1. parity (bench/gpu_parity.py): every supported architecture, world 1, EP 1 under NCCL,
#      converted model vs the HF + LoRA reference on the device; fp32 tight, bf16 per expert
#      layer; expert kernel forced to grouped (the GPU path) and to loop.
#   2. the embedded default for 20 bf16 steps with activation checkpointing under
#      `deepspeed --num_gpus 1`; its summary.json copied, the loss must fall.
#   3. bench/moe_layer.py in bf16 on the device against transformers grouped_mm + PEFT.
# All three run even if one fails; the script exits 1 if any failed.
#
# Assumptions:
#   - PYTHON (default: .venv/bin/python if there, else python3) has a CUDA torch and moe_dist's
#     dependencies (setup.py: deepspeed 0.19.8, transformers, peft, datasets, ...). moe_dist itself
#     is used from this tree through PYTHONPATH, so nothing needs installing. On a machine that can
#     reach a package index, INSTALL=1 runs `$PYTHON -m pip install -e .` first (it keeps a CUDA
#     torch that meets setup.py's pin). The deepspeed launcher is run as `$PYTHON -m
#     deepspeed.launcher.runner`, so the `deepspeed` on PATH does not matter.
#   - The embedded base model is built on first use into .cache/moe_dist (600 pre-training
#     steps on the CPU cores: 112 s on 2 cores, up to 8 threads used); a copy of
#     .cache/moe_dist/tiny-olmoe-s0-p600 (8 MB) carried along skips that.
#   - The dry mode hides any GPU (CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu, gloo), checks 2
#     architectures (olmoe; gpt_oss: biases, its own gate), trains 5 steps (micro-batch 4) of a
#     20-step pre-trained base (built once into .cache/moe_dist, then reused), and times one step
#     at batch 1 x 32. It writes to GPU_CHECK_DIR (default bench/out/gpu_check_dry), never to
#     bench/results/, so CPU figures cannot pass for GPU ones.
#     GPU_CHECK_CACHE=dir: the embedded base's cache_dir for the dry run (tests share theirs).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY="${DRY:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry) DRY=1 ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (use --dry)" >&2; exit 2 ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
    SCRATCH="${GPU_CHECK_DIR:-$ROOT/bench/out/gpu_check_dry}"
    RESULTS="$SCRATCH/results"
    WORK="$SCRATCH"
    DEVICE=cpu
    PARITY_ARGS=(--archs olmoe,gpt_oss)
    TRAIN_ARGS=(train.steps=5 train.warmup_steps=1 train.lr=0.01 train.micro_batch=4 train.log_every=1
                embedded_pretrain_steps=20 ${GPU_CHECK_CACHE:+cache_dir=$GPU_CHECK_CACHE})
    LAYER_ARGS=(--warmup 0 --rounds 1 --steps 1 --variants moe_dist_all_experts --batch 1 --seq 32)
else
    RESULTS="$ROOT/bench/results"
    WORK="$ROOT/bench/out/gpu_check"
    DEVICE=cuda
    PARITY_ARGS=()
    TRAIN_ARGS=(train.steps=20)
    # (not the CPU-only comparison of the fused expert MLP with the loop kernel)
    LAYER_ARGS=(--rounds 11 --steps 5
                --variants moe_dist_all_experts,moe_dist_hot10,moe_dist_all_experts_split_gate_up,moe_dist_attention_only)
fi
mkdir -p "$RESULTS" "$WORK"

if [ "${INSTALL:-0}" = 1 ]; then
    "$PYTHON" -m pip install -e . || exit 1
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
    sys.exit(f"gpu_check: {exc}; install moe_dist's dependencies (INSTALL=1 runs pip install -e .)")
gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}; GPU {gpu}")
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

# 1. parity
step parity "$WORK/parity.log" \
    "$PYTHON" bench/gpu_parity.py --device "$DEVICE" "${PARITY_ARGS[@]}" --out "$RESULTS/gpu_parity.json"

# 2. bf16 training with activation checkpointing (a fresh output dir: an old checkpoint would be resumed)
train_out="$WORK/train"
rm -rf "$train_out"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
train() {
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" launch/train.py \
        --recipe launch/recipes/tiny_lora.yaml train.precision=bf16 train.activation_checkpointing=true \
        data.eval= "export.formats=[]" checkpoint.every=0 "output_dir=$train_out" "${TRAIN_ARGS[@]}" || return
    cp "$train_out/summary.json" "$RESULTS/gpu_train.json" || return
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

# 3. the expert layer in bf16 against transformers grouped_mm + PEFT
step moe_layer "$WORK/moe_layer.log" \
    "$PYTHON" bench/moe_layer.py --dtype bf16 --device "$DEVICE" "${LAYER_ARGS[@]}" --out "$RESULTS/gpu_moe_layer.json"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $WORK)"
    exit 1
fi
echo "gpu_check: all passed; results in $RESULTS"
