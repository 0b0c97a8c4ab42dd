#!/usr/bin/env bash
# One accelerator session in one command: CUDA checks of the training path, the recipe
# on Fashion-MNIST and CIFAR-10 sized to a time budget, then the 1-bit exports and the
# device's test-set logits of the trained students (to check the CPU runtime against).
#
#   benchmarks/gpu_session.sh OUT_DIR [BUDGET_S]
#
# Environment: FMNIST_DIR (default data/fashion-mnist), CIFAR_DIR (data/cifar10), an empty
# value leaves that dataset out (no Fashion-MNIST: no checks and no throughput runs);
# DEVICE (cuda), WORK (runs/gpu_session_<date>_<time>: a new folder each call; an existing
# one is refused), CHECK_SUBSET (4096), SPEED_BATCH (64),
# SPEED_RUNS (5), CKPT_MAX_MB (12: larger checkpoints come back in float16), SKIP_CHECKS (set: no
# checks, no throughput), GRAPH_CHECK (set: with SKIP_CHECKS, still compare CUDA-graph steps
# with eager ones, gpu_checks.py --only cuda-graph-steps; if they differ, or the check fails,
# --cuda-graph is taken out of RECIPE_ARGS), RECIPE_ARGS (extra flags for benchmarks/budget_recipe.py),
# PYTHON (python3). Every step runs even if an earlier
# one failed; the exit status is 1 if any failed.
set -u -o pipefail
OUT=${1:?usage: gpu_session.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-400}
FM=${FMNIST_DIR-data/fashion-mnist}   # set to "" to leave a dataset out
C10=${CIFAR_DIR-data/cifar10}
C10_MODEL=$(printf '%s\n' ${RECIPE_ARGS:-} | sed -n -e 's/^--c10-model=//p' -e '/^--c10-model$/{n;p;}' | tail -n 1)
C10_MODEL=${C10_MODEL:-bhvit_tiny_c32}
DEV=${DEVICE:-cuda}
W=${WORK:-runs/gpu_session_$(date +%Y%m%d_%H%M%S)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -e "$W/runs" ] || [ -e "$W/checks" ]; then
    echo "gpu_session: $W already holds runs; set WORK to a new folder." >&2
    exit 2
fi
mkdir -p "$W" "$OUT"
OUT=$(cd "$OUT" && pwd)   # absolute: the bundles are written from inside $W/bundle
T0=$(date +%s)
RC=0
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
failed() { RC=1; stamp "FAILED: $*"; }

if [ -n "$C10" ]; then
    stamp "decode CIFAR-10 into the cache, in the background"
    # The same channels and size as training's load (part of the cache key).
    $PY -c "import sys, bhvit; from bhvit.data import load_dataset as L; c = bhvit.get_config(sys.argv[2]); [L('cifar10', s, sys.argv[1], channels=c.in_chans, size=c.img_size, progress=True) for s in ('train', 'test')]" \
        "$C10" "$C10_MODEL" >"$W/decode.log" 2>&1 &
fi
rm -f "$OUT/checks.json"   # a file from an earlier session must not stand in for this one's
CHECKED=
if [ -z "${SKIP_CHECKS:-}" ] && [ -n "$FM" ]; then
    CHECKED=1
    stamp "checks"
    $PY benchmarks/gpu_checks.py --device "$DEV" --data-dir "$FM" --work "$W/checks" \
        --subset "${CHECK_SUBSET:-4096}" --json "$OUT/checks.json" || failed "checks"
    stamp "training throughput"
    $PY benchmarks/train_speed.py --device "$DEV" --models bhvit_tiny bhvit_tiny_c32 bhvit_micro_c28 \
        --batch "${SPEED_BATCH:-64}" --runs "${SPEED_RUNS:-5}" --threads 4 --cuda-graph 2>&1 \
        | tee "$OUT/train_speed.txt" || failed "throughput"
elif [ -n "${GRAPH_CHECK:-}" ] && [ -n "$FM" ]; then
    CHECKED=1
    stamp "CUDA-graph step check"
    $PY benchmarks/gpu_checks.py --only cuda-graph-steps --device "$DEV" --data-dir "$FM" \
        --work "$W/checks" --json "$OUT/checks.json" || failed "graph check"
fi
# After any checks: graphed steps that did not match eager ones (or a check that did not
# report) must not train the session's models.
if [ -n "$CHECKED" ] && printf '%s\n' ${RECIPE_ARGS:-} | grep -qx -- '--cuda-graph' \
        && ! $PY -c "import json,sys; r=[c for c in json.load(open(sys.argv[1])) if c['check']=='cuda_graph_verdict']; sys.exit(0 if r and r[0]['ok'] else 1)" \
            "$OUT/checks.json" 2>/dev/null; then
    stamp "CUDA-graph check not passed: the recipe runs without --cuda-graph"
    RECIPE_ARGS=$(printf '%s\n' ${RECIPE_ARGS:-} | grep -vx -- '--cuda-graph' | tr '\n' ' ')
fi
wait
[ -n "$C10" ] && stamp "decode done: $(tail -1 "$W/decode.log")"
REST=$(( BUDGET - ($(date +%s) - T0) ))
if [ "$REST" -lt 60 ]; then
    stamp "only ${REST}s of the ${BUDGET}s budget left: no recipe (raise BUDGET_S)"
    exit 1
fi
stamp "recipe, ${REST}s"
# shellcheck disable=SC2086
$PY benchmarks/budget_recipe.py --out "$W/runs" --budget-s "$REST" --device "$DEV" \
    ${FM:+--fmnist-dir "$FM"} ${C10:+--cifar-dir "$C10"} ${RECIPE_ARGS:-} || failed "recipe"
cp "$W/runs/summary.json" "$OUT/" 2>/dev/null

stamp "exports and logits"
# One tar per run: curves and logs; for students the 1-bit export and the device's test
# logits; the best checkpoint when under CKPT_MAX_MB, else its weights-only float16 copy
# (`bhvit strip`; for a binary student only approximately the same network, the 1-bit
# export is exact). A tar over 15 MiB is split into .partNN files (each returned file must
# stay under 16 MiB): `cat bundle_RUN.tar.part* | tar x` joins them.
for d in "$W"/runs/*/; do
    r=$(basename "$d")
    [ -f "$d/best.json" ] || continue
    b="$W/bundle/$r"
    mkdir -p "$b"
    cp "$d"/metrics.jsonl "$d"/final.json "$d"/curves.png "$b/" 2>/dev/null
    cp "$W/runs/$r.log" "$b/train.log"
    wt="$d/$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['weights'])" "$d/best.json")"
    if [ "$(du -m "$wt" | cut -f1)" -lt "${CKPT_MAX_MB:-12}" ]; then
        cp "$d/best.json" "$wt" "$b/"
    else
        $PY -m bhvit strip "$d" "$b/float16" --dtype float16 >/dev/null || failed "strip $r"
    fi
    case $r in *teacher|*_acts) ;; *)  # a student of binary activations only has no 1-bit export
        $PY -m bhvit export "$d" "$b/export" >"$b/export.json" || failed "export $r"
        $PY -m bhvit eval "$d" --device "$DEV" --no-progress --save-logits "$b/logits_$DEV.npz" \
            >"$b/eval_$DEV.json" || failed "eval $r" ;;
    esac
    (cd "$W/bundle" && tar cf "$OUT/bundle_$r.tar" "$r") || { failed "bundle $r"; continue; }
    if [ "$(du -m "$OUT/bundle_$r.tar" | cut -f1)" -ge 15 ]; then
        split -b 15M -d "$OUT/bundle_$r.tar" "$OUT/bundle_$r.tar.part" && rm "$OUT/bundle_$r.tar"
    fi
done
ls -la "$OUT"
stamp "done"
exit $RC
