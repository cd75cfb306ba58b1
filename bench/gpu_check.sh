#!/usr/bin/env bash
# The checks we run on a GPU machine (the "On a GPU" figures in the README), in one go:
#   1. the CUDA tests and the real torchvision/timm model tests,
#   2. bench/soft_latency.py (fused, static eager, compiled, CUDA-graph replay),
#      bench/step_overhead.py (reference and static LSMLoss, eager and compiled),
#      bench/zoo.py and the fast monitoring score (bench/monitor.py) on the GPU,
#   3. the whole fast test suite with trainer.device=auto resolving to cuda.
#
#   OUT=gpu-out bash bench/gpu_check.sh        # logs land in $OUT
#   PARTS="1 3" bash bench/gpu_check.sh; PARTS=2 bash bench/gpu_check.sh
#
# The parts' time limits add up to about 790 s, above the 600 s that one command may run
# on a lent device machine: run it as the two calls above (about 320 s and 470 s).
#
# Needs a python3 with a CUDA build of torch. Packages that python lacks can be put as wheels
# in .whl/ (installed into /tmp/site, nothing else is touched). Each part has its own time
# limit so one slow part cannot starve the others.
set -u
PARTS=${PARTS:-1 2 3}
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
lscpu | grep -m1 "Model name" || true

if part 1; then
echo "== 1. CUDA tests, real torchvision/timm models"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_margin.py \
  tests/test_models.py 2>&1 | tee "$OUT/tests_cuda.log" | tail -25
fi

if part 2; then
echo "== 2. monitor score, soft measure latency, step overhead and zoo on the GPU"
timeout 60 $PY bench/monitor.py --only time --device cuda --n 1024 4096 --d 512 \
  --repeats 20 2>&1 | tee "$OUT/monitor_cuda.txt"  # the fast score's target: <= 2 ms
timeout 150 $PY bench/soft_latency.py --device cuda --compile --repeats 50 \
  --sizes 128x256,128x2048,512x256,512x2048 2>&1 | tee "$OUT/soft_latency_cuda.txt"
timeout 200 $PY bench/step_overhead.py --device cuda --compile --models convnet --reps 5 \
  --steps 20 --variants "+LSMLoss;+LSMLoss(crossfit);+LSMLoss(K);+LSMLoss(K,crossfit);compiled +LSMLoss(K);compiled +LSMLoss(K,crossfit)" \
  2>&1 | tee "$OUT/step_overhead_cuda.txt"
timeout 60 $PY bench/zoo.py --device cuda --gpu-scale --repeats 5 --warmup 2 2>&1 \
  | tee "$OUT/zoo_cuda.txt"
fi

if part 3; then
echo "== 3. the fast suite, device=auto -> cuda"
timeout 170 $PY -m pytest -q -p no:cacheprovider -rs --timeout 100 2>&1 \
  | tee "$OUT/tests_all.log" | tail -40
fi
