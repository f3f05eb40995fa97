#!/usr/bin/env bash
# telme driver. Usage:
#   bash run.sh demo [meld|iemocap]   # synthetic data + tiny models, all phases, offline, CPU (~2 min)
#   bash run.sh test [pytest args]    # the test suite (CPU, a few minutes)
#   bash run.sh meld [train flags]    # the paper's MELD recipe: prepare -> 3 phases -> eval (one GPU)
#   bash run.sh iemocap [train flags] # the paper's IEMOCAP recipe
#   bash run.sh bench [bench flags]   # decoding, cache and training-speed table (2 CPU cores: ~15 min)
# On first use it creates .venv and installs requirements.txt, unless TELME_PYTHON names a Python
# that has them, or an activated virtualenv/conda environment already has them.
# Every hyperparameter lives in telme.py's PRESETS; extra arguments are passed to `telme.py train`.
set -euo pipefail
cd "$(dirname "$0")"

setup_python() {
  if [[ -n "${TELME_PYTHON:-}" ]]; then PY=$TELME_PYTHON; return; fi
  local probe="import torch, torchvision, torchaudio, transformers, av, sklearn, safetensors, tqdm, pytest"
  if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]] && python -c "$probe" 2>/dev/null; then PY=python; return; fi
  if [[ ! -x .venv/bin/python ]] || ! cmp -s requirements.txt .venv/requirements.installed; then
    echo "run.sh: installing requirements.txt into .venv (first use: a few minutes, ~5 GB)" >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
    cp requirements.txt .venv/requirements.installed
  fi
  PY=.venv/bin/python
}

need_data() {  # need_data NAME DIR FILE-THAT-MUST-EXIST MESSAGE
  if [[ ! -e "$2/$3" ]]; then
    echo "run.sh: $1 not found: $2/$3 is missing." >&2
    echo "$4" >&2
    exit 1
  fi
}

recipe() {  # recipe DATASET DATA_DIR [train flags]
  local dataset=$1 data=$2; shift 2
  local out=${TELME_OUT:-runs/$dataset}
  # Decode every clip once into the media cache (all cores; ~1.3 MB per clip, ~18 GB for MELD).
  $PY telme.py prepare --dataset "$dataset" --data-dir "$data" "$@"
  # Phase 1, teacher (text only, opens no media).
  $PY telme.py train --dataset "$dataset" --data-dir "$data" --out "$out" --phase teacher "$@"
  # Phase 2, audio then visual student, distilled from the frozen teacher.
  $PY telme.py train --dataset "$dataset" --data-dir "$data" --out "$out" --phase students "$@"
  # Phase 3, shifting fusion on the frozen encoders' features.
  $PY telme.py train --dataset "$dataset" --data-dir "$data" --out "$out" --phase fusion "$@"
  $PY telme.py eval --run "$out"
}

command=${1:-help}
shift || true
case "$command" in
  demo)
    setup_python
    $PY telme.py demo --dataset "${1:-meld}" --out "${TELME_OUT:-runs/demo}"
    ;;
  bench)
    setup_python
    # (a) decode MELD-format clips once, then read them cached; (b) full-size training steps per
    # phase; (c) a MELD-sized fusion epoch. `--steps N` times more steps, `--parts ac` skips (b).
    $PY telme.py bench "$@"
    ;;
  test)
    setup_python
    $PY -m pytest -q test_telme.py "$@"
    ;;
  meld)
    MELD_DIR=${MELD_DIR:-data/MELD.Raw}
    need_data MELD "$MELD_DIR" train_sent_emo.csv \
      "MELD comes from https://affective-meld.github.io/ (MELD.Raw.tar.gz, ~10 GB; unpack it and the
train/dev/test tarballs inside). Set MELD_DIR (default data/MELD.Raw) to the folder holding
train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv, train_splits/, dev_splits_complete/
and output_repeated_splits_test/."
    setup_python
    recipe meld "$MELD_DIR" "$@"
    ;;
  iemocap)
    IEMOCAP_DIR=${IEMOCAP_DIR:-data/IEMOCAP_full_release}
    need_data IEMOCAP "$IEMOCAP_DIR" Session1 \
      "IEMOCAP is licensed on request from https://sail.usc.edu/iemocap/. Set IEMOCAP_DIR (default
data/IEMOCAP_full_release) to the folder holding Session1/ ... Session5/, each with
dialog/transcriptions/, dialog/EmoEvaluation/, dialog/avi/DivX/ and sentences/wav/."
    setup_python
    recipe iemocap "$IEMOCAP_DIR" "$@"
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    [[ "$command" == help || "$command" == -h || "$command" == --help ]] || exit 2
    ;;
esac
