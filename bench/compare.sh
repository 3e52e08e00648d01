#!/usr/bin/env bash
# Serving benchmark: the disaggregated stack (1 prefill worker + 1 decode worker) against the
# colocated one (`kimiserve up --colocated`: 1 worker doing both) and, for the same number of
# worker processes, 2 colocated workers; one stack after the other, on the same machine and
# checkpoint, each behind its own gateway and router on free 127.0.0.1 ports.
#
# Each design gets the same CPUs: with THREADS=split (the default) every worker process runs
# CORES / (its stack's worker processes) torch threads (OMP_NUM_THREADS), as each would own its
# GPU; THREADS=default leaves torch's default (every process uses every core).
#
# For each stack: a request-rate sweep of uniform prompts (bench/serve.py), then a mixed load
# where 30 % of the prompts are long (2,048 tokens). Writes bench/results/serve_<mode>.json,
# serve_<mode>_mixed.json, serve.md (side by side) and serve.png. See docs/bench.md.
#
#   bench/compare.sh                                          # about 11 minutes on 2 CPU cores
#   MODES="disaggregated colocated" RATES=1 NUM_PROMPTS=6 MIXED_PROMPTS=6 bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
KIMISERVE=${KIMISERVE:-.venv/bin/kimiserve}
MODEL=${MODEL:-.cache/tiny-kimi-k25}
OUT=${OUT:-bench/results}
MODES=${MODES:-disaggregated colocated colocated-x2}
RATES=${RATES:-1,2,4,8}
NUM_PROMPTS=${NUM_PROMPTS:-60}
MIXED_RATE=${MIXED_RATE:-1.5}
MIXED_PROMPTS=${MIXED_PROMPTS:-60}
SLO=(--slo-ttft-ms "${SLO_TTFT_MS:-1000}" --slo-tpot-ms "${SLO_TPOT_MS:-50}")
THREADS=${THREADS:-split}
CORES=${CORES:-$(nproc)}
LOGS=$(mktemp -d /tmp/kimiserve-compare.XXXXXX)

"$PY" -c 'import matplotlib, openai' || {
  echo "needs the bench extra: $PY -m pip install -e '.[bench]'" >&2
  exit 1
}
[ -f "$MODEL/config.json" ] || "$KIMISERVE" make-tiny-checkpoint "$MODEL"
mkdir -p "$OUT"

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pool_flags() {
  case "$1" in
    disaggregated) echo "--num-prefill 1 --num-decode 1" ;;
    colocated) echo "--colocated --num-decode 1" ;;
    colocated-x2) echo "--colocated --num-decode 2" ;;
    *) echo "unknown mode $1" >&2 && exit 1 ;;
  esac
}

threads_of() {  # torch threads per worker process of MODE's stack
  local processes=2
  [ "$1" = colocated ] && processes=1
  echo $((CORES / processes > 0 ? CORES / processes : 1))
}

stack_pid=""
stop_stack() {  # Ctrl-C to the launcher stops every process of the stack
  [ -n "$stack_pid" ] || return 0
  kill -INT "$stack_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$stack_pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL "$stack_pid" 2>/dev/null || true  # its children end with it (parent-death signal)
  wait "$stack_pid" 2>/dev/null || true
  stack_pid=""
}
trap stop_stack EXIT

start_stack() {  # MODE PORT: starts the stack and waits (at most 5 minutes) until it serves
  local url="http://127.0.0.1:$2" flags threads=()
  read -r -a flags <<<"$(pool_flags "$1")"
  [ "$THREADS" = split ] && threads=("OMP_NUM_THREADS=$(threads_of "$1")")
  env "${threads[@]}" "$KIMISERVE" up --model-path "$MODEL" --port "$2" \
    --control-port "$(free_port)" "${flags[@]}" >"$LOGS/$1.log" 2>&1 &
  stack_pid=$!
  for _ in $(seq 1 300); do
    curl -sf "$url/health/ready" >/dev/null && return 0
    kill -0 "$stack_pid" 2>/dev/null || break
    sleep 1
  done
  echo "the $1 stack did not come up; see $LOGS/$1.log" >&2
  exit 1
}

started=$SECONDS
report=()
for mode in $MODES; do
  pool_flags "$mode" >/dev/null
  port=$(free_port)
  start_stack "$mode" "$port"
  echo "== $mode stack up on port $port at $((SECONDS - started)) s"
  notes="$(pool_flags "$mode"), torch threads per worker: $([ "$THREADS" = split ] &&
    threads_of "$mode" || echo default)"
  common=(--base-url "http://127.0.0.1:$port" --label "$mode" --notes "$notes" "${SLO[@]}")
  "$PY" -m bench.serve "${common[@]}" --request-rates "$RATES" --num-prompts "$NUM_PROMPTS" \
    --input-len 128 --output-len 32 --out "$OUT/serve_$mode.json"
  "$PY" -m bench.serve "${common[@]}" --request-rates "$MIXED_RATE" \
    --num-prompts "$MIXED_PROMPTS" --input-len 64 --output-len 96 --long-fraction 0.3 \
    --long-input-len 2048 --long-output-len 8 --seed 1 --out "$OUT/serve_${mode}_mixed.json"
  stop_stack
  report+=(--sweep "$mode=$OUT/serve_$mode.json" --mixed "$mode=$OUT/serve_${mode}_mixed.json")
done

"$PY" -m bench.serve_report "${report[@]}" --markdown "$OUT/serve.md" --plot "$OUT/serve.png"
echo "== done in $((SECONDS - started)) s: $OUT/serve.md, $OUT/serve.png (logs in $LOGS)"
