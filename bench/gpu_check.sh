#!/usr/bin/env bash
# Every GPU check in one run of at most 10 minutes on one H200 (docs/bench.md, "GPU check"):
#
#   env         python, torch, CUDA, the GPU, which packages are missing   -> env.json
#   attention   FlashInfer against the PyTorch attention backend on the same random pages:
#               max abs difference and time per call, decode and prefill shapes, Kimi-K2.5's
#               MLA dims (64 heads, latent 512 + rope 64), bf16          -> attention.json
#   pytest_gpu  pytest -m gpu tests/test_attention_backends.py          -> pytest_gpu.log
#   checkpoint  a checkpoint of Kimi-K2.5's full layer width, 4 layers, 16 experts, random
#               weights (`make_tiny_checkpoint(size="gpu")`), generated in the background
#               from the start                                           -> checkpoint.log
#   serve       `kimiserve up` on it (1 prefill + 1 decode worker on cuda, bf16) and
#               `bench.serve` at a few request rates                     -> serve.json
#   engine      bench/engine.py --device cuda (tiny checkpoint, fp32, vs transformers on the GPU)
#                                                                        -> engine.json
#
# Every step has its own timeout, all of them share one budget (BUDGET_S, 570 s), and a failed
# step does not stop the others. Everything lands in RESULTS (bench/results/gpu): one log per
# step, gpu_check.log (all output), steps.tsv and summary.json; a table closes the run.
# With COPY_TO set (the device tool's $OUT), the folder is also packed into COPY_TO.
#
#   bench/gpu_check.sh              # on the GPU machine
#   bench/gpu_check.sh --dry-run    # every step on the CPU with tiny sizes, within 3 minutes
#                                   # (BUDGET_S 175), into bench/results/gpu_dry_run
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."

serve_step() {  # the stack up on the checkpoint, the sweep, the stack down
  local port control url stack rc
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  control=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url=http://127.0.0.1:$port
  "$PY" -m deploy.cli up --model-path "$CHECKPOINT" --port "$port" --control-port "$control" \
    --num-prefill 1 --num-decode 1 --worker-device "$DEVICE" --worker-dtype "$DTYPE" \
    --num-pages "$NUM_PAGES" --startup-timeout 240 >"$RESULTS/serve_stack.log" 2>&1 &
  stack=$!
  "$PY" -m bench.gpu_check wait-ready --url "$url" --pid "$stack" --timeout 240 &&
    "$PY" -m bench.serve --base-url "$url" --label "gpu-disaggregated" \
      --notes "bench/gpu_check.sh: $SIZE checkpoint, 1 prefill + 1 decode worker, $DEVICE, $DTYPE" \
      --request-rates "$RATES" --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" \
      --output-len "$OUTPUT_LEN" --out "$RESULTS/serve.json"
  rc=$?
  kill -INT "$stack" 2>/dev/null  # the launcher stops its workers
  for _ in $(seq 1 30); do
    kill -0 "$stack" 2>/dev/null || break
    sleep 1
  done
  kill -KILL "$stack" 2>/dev/null
  wait "$stack" 2>/dev/null
  return $rc
}

if [ "${1:-}" = --serve-step ]; then  # run_step's entry for the serving run (needs `timeout`)
  serve_step
  exit $?
fi

if [ "${1:-}" = --dry-run ]; then
  DRY=1 DEVICE=cpu DTYPE=float32 SIZE=tiny
  RESULTS=${RESULTS:-bench/results/gpu_dry_run} BUDGET_S=${BUDGET_S:-175}
  ATTENTION=(--tiny --dtype float32 --iters 3)
  ENGINE=(--sizes tiny --runs 1 --num-prompts 4 --output-len 16)
  RATES=${RATES:-2} NUM_PROMPTS=${NUM_PROMPTS:-6} INPUT_LEN=64 OUTPUT_LEN=8 NUM_PAGES=512
else
  DRY=0 DEVICE=${DEVICE:-cuda} DTYPE=bfloat16 SIZE=gpu
  RESULTS=${RESULTS:-bench/results/gpu} BUDGET_S=${BUDGET_S:-570}
  ATTENTION=(--dtype bfloat16 --iters 20) ENGINE=(--sizes tiny --runs 1)
  RATES=${RATES:-1,4,16} NUM_PROMPTS=${NUM_PROMPTS:-24} INPUT_LEN=512 OUTPUT_LEN=64
  NUM_PAGES=4096
fi
if [ -z "${PY:-}" ]; then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
WORK=$(mktemp -d /tmp/kimiserve-gpu-check.XXXXXX)  # the checkpoint (3 GB on a GPU run)
CHECKPOINT=$WORK/checkpoint-$SIZE
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
for name in env attention serve engine summary; do rm -f "$RESULTS/$name.json"; done
rm -f "$RESULTS"/{gpu_check,env,attention,pytest_gpu,checkpoint,serve,serve_stack,engine}.log \
  "$RESULTS/steps.tsv"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
started=$SECONDS
echo "== kimiserve GPU check: device $DEVICE, dry run $DRY, budget ${BUDGET_S}s, $PY, $(date -u)"

# Packages the GPU machine lacks can travel as wheels in .whl (docs/bench.md says which).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

record() {  # NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS/steps.tsv"
}

status_of() {  # RC -> ok, timeout or failed
  case "$1" in
    0) echo ok ;;
    124 | 137) echo timeout ;;
    *) echo failed ;;
  esac
}

run_step() {  # NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, budget left)
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$((BUDGET_S - (SECONDS - started)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s of the budget left"
    record "$name" skipped 0 "budget spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s) at $((SECONDS - started))s"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  tail -n 15 "$RESULTS/$name.log"
  record "$name" "$(status_of $rc)" $((SECONDS - t0)) "rc $rc"
}

# The checkpoint is CPU work: it is written while the GPU steps run.
t_checkpoint=$SECONDS
timeout -k 10 $((BUDGET_S > 240 ? BUDGET_S - 120 : BUDGET_S)) \
  "$PY" -m bench.gpu_check checkpoint --size "$SIZE" \
  --out "$CHECKPOINT" >"$RESULTS/checkpoint.log" 2>&1 &
checkpoint_pid=$!

run_step env 60 "$PY" -m bench.gpu_check env --device "$DEVICE" --out "$RESULTS/env.json"
run_step attention 200 "$PY" -m bench.gpu_check attention --device "$DEVICE" "${ATTENTION[@]}" \
  --out "$RESULTS/attention.json"
run_step pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_attention_backends.py

echo "== waiting for the checkpoint at $((SECONDS - started))s"
wait "$checkpoint_pid"
rc=$?
tail -n 3 "$RESULTS/checkpoint.log"
record checkpoint "$(status_of $rc)" $((SECONDS - t_checkpoint)) "rc $rc, in the background"
if [ $rc -eq 0 ]; then
  export PY CHECKPOINT DEVICE DTYPE RESULTS RATES NUM_PROMPTS INPUT_LEN OUTPUT_LEN NUM_PAGES SIZE
  run_step serve 330 bash "$SELF" --serve-step
else
  record serve skipped 0 "no checkpoint"
fi

run_step engine 150 "$PY" -m bench.engine --device "$DEVICE" "${ENGINE[@]}" \
  --out "$RESULTS/engine.json"

echo "== done in $((SECONDS - started))s"
"$PY" -m bench.gpu_check summary --dir "$RESULTS"
if [ -n "${COPY_TO:-}" ]; then
  cp "$RESULTS/summary.json" "$RESULTS/gpu_check.log" "$COPY_TO/" 2>/dev/null
  tar -czf "$COPY_TO/gpu_results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
fi
rm -rf "$WORK"
