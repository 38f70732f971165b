#!/usr/bin/env bash
# Re-run the README's examples on the real all-MiniLM-L6-v2 checkpoint; each command's output goes to
# examples-output/<name>.txt (the README pastes from there). Takes a few minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=examples-output
rm -rf "$OUT"
mkdir -p "$OUT"
python scripts/make_examples.py "$OUT/inputs" >/dev/null
ln -s "$(python -c 'from spectra_cli.checkpoint.demo import demo_checkpoint; print(demo_checkpoint())')" "$OUT/minilm"
cd "$OUT"
run() {  # run NAME CMD…: the command line, then its stdout and stderr, then its exit code when not 0
  local name=$1; shift
  { echo "\$ $*"; "$@" 2>&1; rc=$?; [ "$rc" = 0 ] || echo "(exit code $rc)"; } > "$name.txt"
}
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
run merge-tsv spectra merge minilm a=inputs/lora-a b=inputs/lora-b c=inputs/lora-c --method tsv --out merged-tsv
run merge-rmm spectra merge minilm a=inputs/lora-a b=inputs/lora-b c=inputs/lora-c --method rmm --basis 2 \
    --sweep --out bundle
run reconstruct spectra reconstruct bundle --task b --out b-rebuilt
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
ls
