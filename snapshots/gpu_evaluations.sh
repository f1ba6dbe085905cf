#!/usr/bin/env bash
# The evaluation cells issue 29 still needs, for a GPU lease (hours on a 2-core CPU, minutes on a GPU).
# Every cell resumes where an earlier run (here or on a CPU) stopped: the results files in snapshots/ are copied
# to OUTPUT_DIR and extended there; copy them back and merge them with rmt_training.merge_cells (snapshots/README.md).
# Usage: bash snapshots/gpu_evaluations.sh OUTPUT_DIR        (a dry run elsewhere: DEVICE=cpu SAMPLES=2 ...)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash snapshots/gpu_evaluations.sh OUTPUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cuda} BATCH=${BATCH:-50}
failed=()

run_cells() {  # name checkpoint results-file samples extra-arguments...
    local name=$1 checkpoint=$2 results=$3 samples=$4
    shift 4
    [ -f "snapshots/$results" ] && cp "snapshots/$results" "$out/$results"
    echo "== $name"
    # shellcheck disable=SC2086  # the sample counts are a list
    python3 -m rmt_training.evaluate_lengths "$checkpoint" --results "$out/$results" --device "$DEVICE" \
        --batch-size "$BATCH" --samples ${SAMPLES:-$samples} "$@" 2>&1 | tee -a "$out/$results.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}

# Item 3: the qa1 decoders at 64k tokens on technical prose in the dtypes a user loads (float16: the weights'
# own dtype; bfloat16: the cards' snippets), beside the float32 cells already on the cards.
for dtype in float16 bfloat16; do
    run_cells "armt-minilm-qa1 $dtype" checkpoints/armt-minilm-qa1 armt-minilm-qa1-evaluation.json 100 \
        --tasks qa1 --segments 512 --noise python_docs --dtype "$dtype"
    run_cells "rmt-minilm-qa1 $dtype" checkpoints/rmt-minilm-qa1 rmt-minilm-qa1-evaluation.json 50 \
        --tasks qa1 --segments 512 --noise python_docs --dtype "$dtype"
done

# Item 2: the 512-position classifier's curve, once its checkpoint is exported. 60 documents a task at 4,096 segments
# keep each 95% interval under 25 points whatever the accuracy (24.5 at 50%).
if [ -d checkpoints/rmt-minilm-512 ]; then
    run_cells "rmt-minilm-512" checkpoints/rmt-minilm-512 rmt-minilm-512-evaluation.json "200 200 100 60 60" \
        --tasks memorize detect_memorize reasoning --segments 1 7 64 512 4096
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed or cut short: ${failed[*]}"
    exit 1
fi
echo "all cells done: copy $out/*-evaluation.json to snapshots/ and merge them (snapshots/README.md)"
