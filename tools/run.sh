#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, pip, apt):
#   bash tools/run.sh demo   set up, then build the demo data and run the main job on it
#   bash tools/run.sh test   set up, then run every check CI runs
#   bash tools/run.sh setup  only the set-up (.venv, torch first, the package, system packages)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '\n==> %s\n' "$*" >&2; }

install_system_packages() {
  # FURY 2 renders through wgpu/Vulkan: headless rendering needs Mesa's software Vulkan driver.
  local missing=()
  # Chromium (headless) turns Plotly figures into PNG files and is the browser of the front-end tests
  # (tests/frontend/, driven by playwright: never a downloaded browser).
  for pkg in mesa-vulkan-drivers libvulkan1 chromium; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "warning: ${missing[*]} missing and cannot be installed here (not root or no apt): 3D snapshots will be unavailable"
    return 0
  fi
  log "installing system packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup() {
  install_system_packages
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  # Re-install only when the package's metadata changed since the last set-up.
  local stamp="$VENV/.dwiml_setup_stamp" want
  want=$(cat settings.ini setup.py constraints.txt | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import dwiml_nb, torch' 2>/dev/null; then
    return 0
  fi
  log "installing torch==2.13.0 (CPU build) first, so that nothing pulls a CUDA build"
  "$PY" -m pip install -q "torch==2.13.0" 2> >(grep -v 'WARNING: Location' >&2)
  log "installing dwiml-nb and its dev tools"
  "$PY" -m pip install -q -c constraints.txt -e ".[dev]" 2> >(grep -v 'WARNING: Location' >&2)
  # A kernel spec inside the venv, so that papermill and nbdev run notebooks with this Python.
  "$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (dwiml-nb)" >/dev/null
  echo "$want" > "$stamp"
}

# Mesa's Vulkan driver (FURY's headless rendering) wants a runtime dir; a bare container has none.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR=/tmp/runtime-$(id -u)
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
fi

# nbdev 2.3 imports the deprecated pkg_resources: silence that one warning, keep the rest.
export PYTHONWARNINGS="ignore:pkg_resources is deprecated:UserWarning"

fingerprint() { find "$1" -name "$2" -print0 | sort -z | xargs -0 sha256sum; }

# Fails (with $3 as the message) when the command "${@:4}" changes files $2 under folder $1.
check_unchanged_by() {
  local folder=$1 pattern=$2 message=$3 before after
  before=$(fingerprint "$folder" "$pattern")
  "${@:4}" 2>/dev/null
  after=$(fingerprint "$folder" "$pattern")
  if [ "$before" != "$after" ]; then
    diff <(echo "$before") <(echo "$after") >&2 || true
    log "FAIL: $message"
    return 1
  fi
}

check_notebooks() {
  # (a) exporting must not change the package, (b) source notebooks must be clean.
  check_unchanged_by dwiml_nb '*.py' \
    "exporting the notebooks changed dwiml_nb/ (edit nbs/, then run nbdev_export and commit both)" \
    "$VENV/bin/nbdev_export" || return 1
  check_unchanged_by nbs '*.ipynb' \
    "a source notebook was not clean (outputs or metadata); nbdev_clean has now cleaned it" \
    "$VENV/bin/nbdev_clean" || return 1
  log "notebooks: exported package up to date, notebooks clean"
}

run_tests() {
  check_notebooks
  log "ruff (ruff.toml: notebooks, tests, benchmarks, tools)"
  "$VENV/bin/ruff" check --quiet || { log "FAIL: ruff"; return 1; }
  log "nbdev notebook tests"
  "$VENV/bin/nbdev_test" --n_workers 2 --skip_file_glob 'train_model.ipynb' || { log "FAIL: nbdev notebook tests"; return 1; }
  log "pytest"
  # --dist loadscope: a module's tests stay in one worker, so a module-scoped fixture (a training
  # run, a JupyterLab server) is built once.
  "$PY" -m pytest -n 2 --dist loadscope -q tests "$@"
}

demo() {
  # The main job: build the demo data, then run the training notebook on it with papermill.
  # --log-output streams what the notebook prints (one line per epoch) to this terminal.
  local out=${DWIML_DEMO_DIR:-$ROOT/demo} runs=${DWIML_RUNS_DIR:-$ROOT/runs}
  "$VENV/bin/dwiml_make_demo_dataset" "$out" --overwrite --quiet
  "$VENV/bin/dwiml_describe_hdf5" "$out/phantom.hdf5"
  mkdir -p "$runs"
  log "training the example model (nbs/train_model.ipynb with papermill; about a minute on 2 cores)"
  local status=0
  "$VENV/bin/papermill" nbs/train_model.ipynb "$runs/train_model.ipynb" -k python3 --log-output --no-progress-bar \
    -p hdf5_file "$out/phantom.hdf5" -p experiments_path "$runs/experiments" \
    -p experiment_name demo -p overwrite True -p progress False "$@" 2>&1 | tee "$runs/papermill.log" | demo_filter \
    || status=$?
  if [ "$status" != 0 ]; then
    tail -n 40 "$runs/papermill.log" >&2
    log "FAIL: the training notebook stopped (full output: $runs/papermill.log, notebook: $runs/train_model.ipynb)"
    return "$status"
  fi
  local exp="$runs/experiments/demo"
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("\nvalidation angular error: untrained model %.1f deg, trained model %.1f deg (%d epochs)" % (r["validation_angular_error_untrained_deg"], r["validation_angular_error_best_model_deg"], r["epochs_trained"]))' "$exp/results.json"
  cat <<EOM

Done. What the run left behind:
  executed notebook : $runs/train_model.ipynb
  logs              : $exp/logs/ (batches.csv, epochs.csv, *_per_epoch.npy)
  best model        : $exp/best_model/model_state.pt
  last model        : $exp/last_model/model_state.pt
  checkpoint        : $exp/checkpoint/
Continue it:  .venv/bin/papermill nbs/train_model.ipynb $runs/resume.ipynb -k python3 \\
                -p hdf5_file $out/phantom.hdf5 -p experiments_path $runs/experiments \\
                -p experiment_name demo -p resume True -p max_epochs 12
EOM
}

# papermill's --log-output prints every output of the notebook (the text forms of widgets
# included): show the notebook's log lines and results as they come.
demo_filter() {
  grep --line-buffered -E '^(INFO|WARNING|ERROR) |^(data|experiments): |^untrained model|^[0-9]+ training and' || true
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; run_tests "$@" ;;
  demo) setup; demo "$@" ;;
  *) echo "usage: bash tools/run.sh {demo|test|setup}" >&2; exit 2 ;;
esac
