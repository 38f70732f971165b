#!/usr/bin/env bash
# Build the example inputs and run every example of the README's tour and of docs/commands/ on the real
# all-MiniLM-L6-v2 checkpoint. Everything lands in examples-output/:
#   examples-output/minilm        a link to the demo checkpoint
#   examples-output/inputs/       sentences.txt, lora-a/-b/-c and lora-broken (PEFT adapters), layer*.npy
#   examples-output/<name>.txt    each command line, its output, and its exit code when not 0
# Afterwards `cd examples-output` and every tour line of the README runs as written.
# About 3½ minutes of CPU time (longer on a busy machine); one line per step on stderr says where it is.
# SPECTRA_NO_SETUP=1 skips scripts/setup.sh (for a checkout whose environment is already active).
set -uo pipefail
cd "$(dirname "$0")/.."
say() { echo "examples: $*" >&2; }
if [ "${SPECTRA_NO_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh --examples || exit 1
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1
OUT=examples-output
rm -rf "$OUT"
mkdir -p "$OUT"
say "building the inputs in $OUT/inputs (sentences, 4 LoRA adapters, MiniLM hidden states; ~30 s)"
# transformers' own progress bars go to a log, not the terminal
python scripts/make_examples.py "$OUT/inputs" >/dev/null 2>"$OUT/make_examples.log" \
  || { cat "$OUT/make_examples.log" >&2; say "building the inputs failed"; exit 1; }
ln -s "$(python -c 'from spectra_cli.checkpoint.demo import demo_checkpoint; print(demo_checkpoint())')" "$OUT/minilm"
cd "$OUT"
total=$(grep -c '^run ' "../scripts/examples.sh")
step=0
failed=0
run() {  # run NAME CMD…: the command line, then its stdout and stderr, then its exit code when not 0
  local name=$1; shift
  step=$((step + 1))
  say "[$step/$total] $name: $*"
  local t0=$SECONDS rc
  { echo "\$ $*"; "$@" 2>&1; rc=$?; [ "$rc" = 0 ] || echo "(exit code $rc)"; } > "$name.txt"
  rc=$(sed -n 's/^(exit code \([0-9]*\))$/\1/p' "$name.txt" | tail -1)
  say "      $name: $((SECONDS - t0)) s${rc:+, exit code $rc} -> $OUT/$name.txt"
  [ -z "$rc" ] || [ "$name" = check-fail ] || failed=$((failed + 1))
}
run analyze spectra analyze minilm --kinds query,value --plots plots-analyze
run compare spectra compare minilm inputs/lora-a --include '*layer.[01].*'
run compare-plots spectra compare minilm inputs/lora-a inputs/lora-b --kinds query,value --plots plots-compare -q
run rankme-layers spectra rankme inputs/layer0.npy inputs/layer2.npy inputs/layer4.npy inputs/layer6.npy
run rankme-model spectra rankme --model minilm --texts inputs/sentences.txt
run allocate spectra allocate minilm --kinds query,value --budget-rank 8 --multiple-of 4 --peft-config lora.json
run allocate-welore spectra allocate minilm --kinds query,value --budget-rank 8 --strategy welore
run capture spectra capture minilm --data inputs/sentences.txt --kinds query,key,value --stats both \
    --components 32 --out acts.safetensors
run init-pissa spectra init-adapter minilm --method pissa --rank 8 --kinds query,value --out pissa-r8
run init-eva spectra init-adapter minilm --method eva --rank 8 --kinds query,key,value \
    --activations acts.safetensors --out eva-r8
run init-corda spectra init-adapter minilm --method corda --rank 8 --kinds query,value \
    --activations acts.safetensors --out corda-r8
run init-load python ../scripts/check_roundtrip.py minilm pissa-r8 eva-r8 corda-r8
run merge-tsv spectra merge minilm a=inputs/lora-a b=inputs/lora-b c=inputs/lora-c --method tsv --out merged-tsv \
    --plots plots-merge
run merge-rmm spectra merge minilm a=inputs/lora-a b=inputs/lora-b c=inputs/lora-c --method rmm --basis 2 \
    --sweep --out bundle --plots plots-rmm
run reconstruct spectra reconstruct bundle --task b --out b-rebuilt
run track spectra track inputs/run --base minilm --kinds query,value --plots plots-track
run align spectra align minilm inputs/minilm-planted --out minilm-aligned
# the tsv merge is a full fine-tune of MiniLM: extract a LoRA adapter back out of it
run init-extract spectra init-adapter minilm --method extract --tuned merged-tsv --energy 0.9 \
    --kinds query,value --out extracted
cat > gate.toml <<'TOML'
[rules]
no_nonfinite = true
max_intruders = 0
max_relative_delta = 0.2
max_spectral_norm = 100.0
TOML
run check-pass spectra check inputs/lora-a --base minilm --kinds query,value --policy gate.toml --junit junit.xml
run check-fail spectra check inputs/lora-broken --base minilm --kinds query,value --policy gate.toml \
    --markdown summary.md --github
cp summary.md check-fail-summary.txt 2>/dev/null
run report-analyze sh -c 'spectra analyze minilm -f json -o analyze.json -q && spectra report analyze.json -o analyze.html'
if [ "$failed" = 0 ]; then
  say "done: every example ran (check-fail exits 1 on purpose); outputs in $OUT/"
else
  say "done: $failed example(s) exited non-zero (see the '(exit code N)' lines in $OUT/*.txt)"
  exit 1
fi
