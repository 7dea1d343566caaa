#!/bin/bash
# Runs table cells on one lent GPU inside a fixed time box (issue 13, item 5).
#
#   bash experiments/gpu_tables.sh START_LIMIT_S OUT_DIR [extra sweep flags...]
#
# e.g. on the device machine:
#   bash experiments/gpu_tables.sh 420 $OUT --config.base.stats.embed_batch=1024
#
# Three chains of cells share the card, each a `launch.sweep --workers=W`
# (one process per cell, so compilation, which dominates these small cells on
# a GPU, overlaps across the machine's cores; all processes share one JAX
# compilation cache):
#   A (8 workers): reference_table.py:main, the five distillation variants
#      (CollabDM count / uniform, authors' mode, merged local DM, central DM),
#      grid point by grid point; central DM's copies at the later grid points
#      after them (the partition does not touch central DM, so they repeat the
#      first point's runs); then the FedAvg cells, grid point by grid point
#      from K = 5, alpha = 0.5, then the DENSE cells in the same order. Both
#      start from every client's ConvNet trained with validated lr and
#      epochs (far slower than a DM cell); the cells share one client-model
#      cache ($SW/client_models, baseline.client_cache_dir), so a DENSE
#      cell reads the models its FedAvg cell trained instead of training
#      them again;
#   B (3 workers): reference_table.py:ipc, then reference_table.py:cifar10's
#      distillation variants, then its FedAvg and then its DENSE cells;
#   C (1 worker): paper-budget cells of fmnist_table_paper.py (K = 5, ipc 10,
#      alpha 0.1 and 0.5; CollabDM, merged local DM, central DM; one seed).
#
# Cells already committed are skipped (see RERUN_COMMITTED below).
# No cell starts after START_LIMIT_S seconds from the start of this script;
# running cells finish. Every 30 s (and at the end) the small files of every
# cell (results.json, cell.json, error.json, logs) are packed into
# OUT_DIR/cells.tar.gz, and seed 0's synthetic.npz into OUT_DIR/synthetic.tar.gz,
# so whatever finished comes back even if the command is cut off. Rerunning
# with the unpacked folders as workdirs skips the finished cells.
#
# Expects (when run from the device tool): wheels of packages the GPU image
# lacks in .whl/, the datasets in .gpudata/ (fashion-mnist/ IDX files,
# cifar10/cifar10-jpeg.tar.gz).
set -u
START_LIMIT_S=${1:?start limit in seconds}
OUT_DIR=${2:?output folder}
shift 2
EXTRA=("$@")
T0=$(date +%s)
SW=${SWEEP_ROOT:-/tmp/sweeps}
mkdir -p "$SW" "$OUT_DIR"

# The cells committed under experiments/results/ are finished: they are copied
# into the workdirs first, so the sweeps skip them and a lent card's few
# minutes go to the cells still missing (on 2026-11-28, 93 of 123 were
# committed; the missing ones are FedAvg's and DENSE's). RERUN_COMMITTED=1
# starts from empty workdirs instead, to reproduce the committed cells.
if [ "${RERUN_COMMITTED:-0}" != 1 ]; then
  for t in reference_main reference_ipc reference_cifar10 paper_fashion_mnist; do
    if [ -d "experiments/results/$t/cells" ]; then
      mkdir -p "$SW/$t"
      cp -rn "experiments/results/$t/cells/." "$SW/$t/"
    fi
  done
fi

WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -d .gpudata ] && [ -z "${COLLABDM_DATA_DIR:-}" ]; then
  export COLLABDM_DATA_DIR=$PWD/.gpudata
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

left() { echo $(( START_LIMIT_S - ($(date +%s) - T0) )); }

# The indices (in the sweep's own order) of the cells whose name matches
# $2, in the order of the patterns given.
cells() {
  local config=$1; shift
  local listing
  listing=$("$PY" -m launch.sweep --config="$config" --workdir=/tmp/none \
            --list_cells "${EXTRA[@]}" 2>/dev/null)
  local pat
  for pat in "$@"; do
    echo "$listing" | awk -F'\t' -v p="$pat" '$3 ~ p {print $1}'
  done | awk '!seen[$0]++' | paste -sd, -
}

sweep() {  # config workdir workers cells [more sweep flags]
  local l
  l=$(left)
  if [ "$l" -le 0 ]; then return; fi
  "$PY" -m launch.sweep --config="$1" --workdir="$2" --workers="$3" \
    --cells="$4" --stop_starting_after_s="$l" \
    --results_dir="$2/tables" "${EXTRA[@]}" "${@:5}" >>"$2.log" 2>&1
}

pack() {
  (cd "$SW" && find . -type f \( -name results.json -o -name cell.json \
      -o -name error.json -o -name log.txt -o -name '*.log' \) -print0 \
    | tar czf "$OUT_DIR/cells.tar.gz.tmp" --null -T - 2>/dev/null \
    && mv "$OUT_DIR/cells.tar.gz.tmp" "$OUT_DIR/cells.tar.gz")
  # Seed 0's synthetic sets only (for pictures): all of them passed the
  # 16 MiB a returned file may have.
  (cd "$SW" && find . -name synthetic.npz \( -path '*seed=0*' \
      -o -path '*paper*' \) -print0 \
    | tar czf "$OUT_DIR/synthetic.tar.gz.tmp" --null -T - 2>/dev/null \
    && mv "$OUT_DIR/synthetic.tar.gz.tmp" "$OUT_DIR/synthetic.tar.gz")
}

MAIN=experiments/configs/reference_table.py:main
IPC=experiments/configs/reference_table.py:ipc
CIFAR=experiments/configs/reference_table.py:cifar10
PAPER=experiments/configs/fmnist_table_paper.py:fashion_mnist
DM='variant=(collabdm_count|collabdm_uniform|authors|merged_local_dm)'
DMC='variant=(collabdm_count|collabdm_uniform|authors|merged_local_dm|central_dm)'
GRID=("partition.alpha=0.5,partition.num_clients=5,"
  "partition.alpha=0.1,partition.num_clients=5,"
  "partition.alpha=0.5,partition.num_clients=10,"
  "partition.alpha=0.1,partition.num_clients=10,")
MAIN_CELLS=$(cells $MAIN \
  "$DMC,${GRID[0]}" "$DM,${GRID[1]}" "$DM,${GRID[2]}" "$DM,${GRID[3]}" \
  "$DMC" \
  "${GRID[@]/#/variant=fedavg,}" "${GRID[@]/#/variant=dense,}")
IPC_CELLS=$(cells $IPC "variant=")
CIFAR_CELLS=$(cells $CIFAR "$DMC" "variant=fedavg" "variant=dense")
CACHE=(--config.base.baseline.client_cache_dir="$SW/client_models")
echo "main: $MAIN_CELLS"; echo "ipc: $IPC_CELLS"; echo "cifar10: $CIFAR_CELLS"
PAPER_FLAGS=(--config.grid.partition.num_clients='(5,)'
  --config.grid.partition.alpha='(0.5,0.1)' --config.grid.server.ipc='(10,)'
  --config.grid.method="('collabdm','merged_local_dm','central_dm')")

(sweep $MAIN "$SW/reference_main" 8 "$MAIN_CELLS" "${CACHE[@]}") &
A=$!
(sweep $IPC "$SW/reference_ipc" 3 "$IPC_CELLS"
 sweep $CIFAR "$SW/reference_cifar10" "${CIFAR_WORKERS:-3}" "$CIFAR_CELLS" \
   "${CACHE[@]}") &
B=$!
(EXTRA+=("${PAPER_FLAGS[@]}")
 PC=$(cells $PAPER "method=")
 sweep $PAPER "$SW/paper_fashion_mnist" 1 "$PC") &
C=$!
while kill -0 $A 2>/dev/null || kill -0 $B 2>/dev/null \
      || kill -0 $C 2>/dev/null; do
  sleep 30
  pack
  echo "$(( $(date +%s) - T0 )) s: $(find "$SW" -name results.json | wc -l) cells done"
done
pack
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
echo "all chains ended after $(( $(date +%s) - T0 )) s"
