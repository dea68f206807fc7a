#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU; under 5 minutes. From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. installs lkflow (into the Python that already has a CUDA torch, else a fresh venv as the
#    README says), 2. runs the GPU-marked tests (one-GPU fits, mixed precision, the training
#    step under torch.cuda.set_sync_debug_mode("error"): no host synchronisation in lkflow's
#    step, and the GPU's use among the run's system metrics), 3. runs the MLflow project's two
#    entry points on the GPU, 4. the GPU benchmark.
#
# On a machine without a package index, download the wheels beforehand where pip works
# (`pip download -d wheels ".[test,gpu]"` for that machine's Python and platform), carry the
# folder, and point LKFLOW_WHEELS at it: `LKFLOW_WHEELS=wheels bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
offline=()
[ -n "${LKFLOW_WHEELS:-}" ] && offline=(--no-index --find-links "$LKFLOW_WHEELS")

if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    python3 -m pip install -q "${offline[@]}" -e ".[test,gpu]"
else
    python3 -m venv "$work/venv"
    . "$work/venv/bin/activate"
    pip install -q "${offline[@]}" torch && pip install -q "${offline[@]}" -e ".[test,gpu]"
fi
python3 -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
export PATH="$(python3 -c 'import sys, os; print(os.path.dirname(sys.executable))'):$PATH"

echo "== GPU-marked tests"
python3 -m pytest -q -m gpu tests/

echo "== mlflow run on the GPU"
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
cp -r MLproject conda.yaml pyproject.toml lkflow examples "$work/"
(cd "$work" && mlflow run . --env-manager local -P gpus=1 -P epochs=3 \
    && mlflow run . --env-manager local -e digits -P gpus=1 -P epochs=3)
python3 - <<'PY'
from mlflow import MlflowClient
runs = MlflowClient().search_runs(["0"])
for run in runs:
    print(run.info.run_name, run.info.status, run.data.params.get("devices"),
          {k: round(v, 4) for k, v in run.data.metrics.items() if k.startswith("best_")})
assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
PY

echo "== GPU benchmark"
python3 -m benchmarks.gpu --rounds 3 --epochs 3
