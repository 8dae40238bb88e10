#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests, then every Fashion-MNIST suite setting, one process per
# setting on the one GPU, side by side. Results (suite_fashion-*.json/md/npz, logs) go to $1 as
# one archive, gpu_suite.tar.gz. With PEERS_DIR (an earlier run's files), the peers' rows are
# copied from it rather than run again (suite.py --peers-from). Used to produce docs/_generated/suite_fashion.* (see
# docs/benchmarks.md); `python benchmarks/suite.py --dataset fashion` runs the same on a CPU.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [SEEDS [PEERS_DIR]]}
seeds=${2:-2}
peers=${3:-}
work=$(mktemp -d)
nvidia-smi -L | tee "$work/gpu.txt"
python3 -c "import torch, sklearn, cleanlab; print('torch', torch.__version__, 'sklearn', sklearn.__version__, 'cleanlab', cleanlab.__version__)" | tee -a "$work/gpu.txt"
for s in fashion-sym-0.2 fashion-sym-0.4 fashion-sym-0.8 fashion-pairs fashion-cc; do
  timeout "${SUITE_TIMEOUT:-480}" python3 benchmarks/suite.py --settings "$s" --device cuda --seeds "$seeds" \
    ${peers:+--peers-from "$peers/suite_$s.json"} --out "$work/suite_$s.md" >/dev/null 2>"$work/log_$s.txt" &
done
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_estimator.py -k cuda 2>&1 | tail -5 | tee "$work/cuda_tests.txt"
wait
tail -n 3 "$work"/log_*.txt
tar -czf "$out/gpu_suite.tar.gz" -C "$work" .
