#!/usr/bin/env bash
# The GPU checks and measurements of one short GPU lease, in one command:
#
#     benchmarks/gpu_session.sh OUT_DIR [OFFICIAL_CUT_DIR] [AFHQ_DIR]
#
# 1. tests/test_cuda.py: the networks, a training step of each method and `lowcon translate` on
#    the GPU against lowcon's CPU kernels;
# 2. bench_translation.py --device cuda: CUT, FastCUT and CycleGAN training steps, lowcon in
#    float32 beside the official code (when OFFICIAL_CUT_DIR is given), then lowcon with bf16: true;
# 3. with AFHQ_DIR (cat/ and dog/): `lowcon train cut` on the GPU at the preset's 256 px for a
#    fixed number of epochs, then `lowcon translate` of the cats on the GPU.
#
# Runs with the machine's own python3 and torch (lowcon from src/, nothing installed). Every step
# has its own time limit and the next one runs whatever happened; all logs and results land in
# OUT_DIR, packed into OUT_DIR/gpu_session.tar.gz at the end.
set -u
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [OFFICIAL_CUT_DIR] [AFHQ_DIR]}
official=${2:-}
afhq=${3:-}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu REPEATS=1 SIZE=64 AFHQ_EPOCHS=1: a dry run of this script on a CPU
bench=(--device "$device" --repeats "${REPEATS:-30}" --warmup "${WARMUP:-5}" --size "${SIZE:-256}")
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp machine
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  nproc; } 2>&1 | tee "$out/machine.txt"

stamp tests/test_cuda.py
[ "$device" = cuda ] || export LOWCON_TEST_DEVICE="$device"
timeout 240 "$python" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs 2>&1 | tee "$out/test_cuda.log"

if [ -n "$official" ]; then
  stamp "bench_translation float32, lowcon and official"
  timeout 300 "$python" benchmarks/bench_translation.py "${bench[@]}" --official "$official" --out "$out/translation_gpu.json" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$out/bench_fp32.log"
fi
stamp "bench_translation bf16"
timeout 200 "$python" benchmarks/bench_translation.py "${bench[@]}" --bf16 --out "$out/translation_gpu_bf16.json" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$out/bench_bf16.log"

if [ -n "$afhq" ]; then
  stamp "lowcon train cut on AFHQ cat -> dog, GPU"
  run=$(mktemp -d)/afhq
  timeout "${AFHQ_SECONDS:-170}" "$python" -m lowcon --quiet train cut --run-dir "$run" --device "$device" \
    --set dir_a="$afhq/cat" --set dir_b="$afhq/dog" --set n_epochs="${AFHQ_EPOCHS:-25}" \
    --set n_epochs_decay="${AFHQ_EPOCHS:-25}" --set num_workers=4 --set sample_every=250 \
    --set checkpoint_every=200 --set save_epoch_every=0 2>&1 | tee "$out/afhq_train.log"
  stamp "lowcon translate the cats, GPU"
  start=$(date +%s%N)
  "$python" -m lowcon --quiet translate "$afhq/cat" -o "$out/afhq_cat2dog" --checkpoint "$run/last.pt" \
    --device "$device" 2>&1 | tee "$out/afhq_translate.log"
  echo "translate wall ms: $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$out/afhq_translate.log"
  cp "$run/log.csv" "$run/config.yaml" "$run/train.log" "$out/" 2>/dev/null
  mkdir -p "$out/afhq_samples" && cp "$run"/samples/* "$out/afhq_samples/" 2>/dev/null
fi
stamp done
tar -czf "$out.tar.gz" -C "$out" . && mv "$out.tar.gz" "$out/gpu_session.tar.gz"
