#!/usr/bin/env bash
# telme driver. Usage:
#   bash run.sh demo [meld|iemocap] [--quiet]  # synthetic data + tiny models, all phases, offline, CPU (~2 min)
#   bash run.sh test [pytest args]    # the test suite (CPU, a few minutes)
#   bash run.sh meld [train flags]    # the paper's MELD recipe: prepare -> 3 phases -> eval (one GPU;
#                                     # training steps compiled, --no-compile for eager)
#   bash run.sh iemocap [train flags] # the paper's IEMOCAP recipe
#   bash run.sh bench [bench flags]   # decoding, cache and training-speed table (2 CPU cores: ~10 min)
#   add --seeds N to demo/meld/iemocap: N runs, seeds 42.., into runs/DATASET/seedS, then
#   runs/DATASET/summary.json and a table of mean ± std per phase
#   add --gpus G to meld/iemocap: one run over G GPUs (torchrun, DDP); with --seeds N: one seed per GPU
#   add --threads N to demo/meld/iemocap/bench: torch's CPU threads (default: $OMP_NUM_THREADS, else the
#   cores this process may use; the demo's: 1); on a CPU shared with other jobs, 1 avoids threads spinning
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
    # The pinned numpy, scipy and scikit-learn need Python 3.11 or later.
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "run.sh: $(python3 --version 2>&1) found; telme needs Python 3.11 or later (or set TELME_PYTHON)" >&2
      exit 1
    fi
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

recipe() {  # recipe DATASET DATA_DIR [train flags]: one run, or one per seed (--seeds N)
  local dataset=$1 data=$2; shift 2
  # torch.compile: on an H200 the encoders' steps ran ~1.7x the eager rate (README: Speed);
  # --no-compile among the flags turns it off.
  set -- --compile "$@"
  local out=${TELME_OUT:-runs/$dataset} train=("$PY" telme.py train)
  # --gpus G for a single run: every phase on G GPUs with DistributedDataParallel (batch 4 per GPU).
  if [[ -n "$GPUS" && -z "${SEEDS:-}" ]]; then
    train=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" telme.py train)
  fi
  # Decode every clip once into the media cache (all cores; ~1.3 MB per clip, ~18 GB for MELD).
  $PY telme.py prepare --dataset "$dataset" --data-dir "$data" "$@"
  if [[ -z "$SEEDS" ]]; then phases "$dataset" "$data" "$out" "$@"; return; fi
  local runs=() seed
  for ((seed = FIRST_SEED; seed < FIRST_SEED + SEEDS; seed++)); do
    on_gpu "$out/seed$seed.log" phases "$dataset" "$data" "$out/seed$seed" "$@" --seed "$seed"
    runs+=("$out/seed$seed")
  done
  wait_gpus
  $PY telme.py summarize --out "$out" "${runs[@]}" ${THREADS[@]+"${THREADS[@]}"}
}

phases() {  # phases DATASET DATA_DIR OUT [train flags]: the three phases, eval, wall-clock
  local dataset=$1 data=$2 out=$3 started=$SECONDS resumed=""; shift 3
  # A run already begun in OUT (an interrupted one, say) is resumed: complete phases are skipped,
  # and its config.json must agree with the flags given now.
  if [[ -f "$out/config.json" ]]; then
    echo "run.sh: resuming $out (complete phases are skipped; for a new run delete it or set TELME_OUT)" >&2
    resumed=1
    set -- "$@" --resume "$out"
  fi
  # Phase 1, teacher (text only, opens no media).
  "${train[@]}" --dataset "$dataset" --data-dir "$data" --out "$out" --phase teacher "$@"
  # Phase 2, audio then visual student, distilled from the frozen teacher.
  "${train[@]}" --dataset "$dataset" --data-dir "$data" --out "$out" --phase students "$@"
  # Phase 3, shifting fusion on the frozen encoders' features.
  "${train[@]}" --dataset "$dataset" --data-dir "$data" --out "$out" --phase fusion "$@"
  $PY telme.py eval --run "$out" ${THREADS[@]+"${THREADS[@]}"}
  # The wall-clock of a run done in one go (a resumed run's time is split over several).
  if [[ -z "$resumed" ]]; then
    echo "$((SECONDS - started))" > "$out/wall_clock_s.tmp" && mv "$out/wall_clock_s.tmp" "$out/wall_clock_s"
  fi
}

demo() {  # demo [meld|iemocap] [demo flags]: one demo, or one per seed (--seeds N) and their summary
  local dataset=meld out=${TELME_OUT:-runs/demo}
  if [[ "${1:-}" == meld || "${1:-}" == iemocap ]]; then dataset=$1; shift; fi
  if [[ -z "$SEEDS" ]]; then $PY telme.py demo --dataset "$dataset" --out "$out" "$@"; return; fi
  local runs=() seed started
  for ((seed = FIRST_SEED; seed < FIRST_SEED + SEEDS; seed++)); do
    started=$SECONDS
    $PY telme.py demo --dataset "$dataset" --out "$out/seed$seed" --seed "$seed" "$@"
    echo "$((SECONDS - started))" > "$out/seed$seed/wall_clock_s"
    runs+=("$out/seed$seed")
  done
  $PY telme.py summarize --out "$out" "${runs[@]}" ${THREADS[@]+"${THREADS[@]}"}
}

# --seeds N (demo, meld, iemocap): N runs with seeds FIRST_SEED.. (the official seed is 42).
# --gpus G: with --seeds, the per-seed runs go G at a time, the k-th of a round on GPU k
# (CUDA_VISIBLE_DEVICES), each logging to a file; the summary waits for all of them.
SEEDS="" FIRST_SEED=42 GPUS="" GPU_PIDS=() ARGS=() THREADS=()
take_counts() {  # take_counts ARGS...: SEEDS and GPUS from --seeds N and --gpus G, ARGS the rest
  while (($#)); do
    case "$1" in
      --threads)  # torch's CPU threads: for train and prepare (in ARGS), and for eval and summarize
        THREADS=("$1" "${2:-}") ARGS+=("$1" "${2:-}")
        shift 2 || shift ;;
      --threads=*) THREADS=("$1") ARGS+=("$1"); shift ;;
      --seeds | --gpus)
        [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: $1 needs a positive count" >&2; exit 2; }
        if [[ "$1" == --seeds ]]; then SEEDS=$2; else GPUS=$2; fi
        shift 2 ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
}

on_gpu() {  # on_gpu LOG COMMAND...: COMMAND now, or under --gpus in the background on a free GPU
  local log=$1; shift
  if [[ -z "$GPUS" ]]; then "$@"; return; fi
  if ((${#GPU_PIDS[@]} == GPUS)); then wait_gpus; fi  # every GPU busy: let this round finish
  local gpu=${#GPU_PIDS[@]}
  mkdir -p "$(dirname "$log")"
  echo "run.sh: GPU $gpu: $* (log: $log)" >&2
  CUDA_VISIBLE_DEVICES=$gpu "$@" > "$log" 2>&1 &
  GPU_PIDS+=($!)
}

wait_gpus() {  # wait for the runs on_gpu started; stop if any failed
  local pid failed=0
  for pid in ${GPU_PIDS[@]+"${GPU_PIDS[@]}"}; do wait "$pid" || failed=1; done
  GPU_PIDS=()
  ((failed == 0)) || { echo "run.sh: a run on a GPU failed; see its log" >&2; exit 1; }
}

command=${1:-help}
shift || true
case "$command" in
  demo)
    take_counts "$@"
    [[ -z "$GPUS" ]] || { echo "run.sh: --gpus is for meld and iemocap; the demo runs on one device" >&2; exit 2; }
    setup_python
    demo ${ARGS[@]+"${ARGS[@]}"}
    ;;
  bench)
    setup_python
    # (a) decode MELD-format clips once into the cache; (b) full-size training steps per
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
    take_counts "$@"
    setup_python
    recipe meld "$MELD_DIR" ${ARGS[@]+"${ARGS[@]}"}
    ;;
  iemocap)
    IEMOCAP_DIR=${IEMOCAP_DIR:-data/IEMOCAP_full_release}
    need_data IEMOCAP "$IEMOCAP_DIR" Session1 \
      "IEMOCAP is licensed on request from https://sail.usc.edu/iemocap/. Set IEMOCAP_DIR (default
data/IEMOCAP_full_release) to the folder holding Session1/ ... Session5/, each with
dialog/transcriptions/, dialog/EmoEvaluation/, dialog/avi/DivX/ and sentences/wav/."
    take_counts "$@"
    setup_python
    recipe iemocap "$IEMOCAP_DIR" ${ARGS[@]+"${ARGS[@]}"}
    ;;
  *)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [[ "$command" == help || "$command" == -h || "$command" == --help ]] || exit 2
    ;;
esac
