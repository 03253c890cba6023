#!/usr/bin/env bash
# metarun's side of a parity run: the algorithm's Omniglot 5-way 1-shot preset with the values its
# reference ran with, STEPS outer steps, the test protocol (600 tasks) every EVERY steps, one thread.
#
#   bash parity/metarun.sh ALGORITHM SEED STEPS EVERY [override ...]
#   bash parity/metarun.sh reptile 0 1000 250          # -> parity/runs/reptile/metarun/seed0
#
# The run folder holds results.json with test_curve, which `metarun report parity/runs/<algorithm>
# --by implementation` pools with the reference's runs (parity/<reference>/README.md has their commands).
set -euo pipefail
cd "$(dirname "$0")/.."
algorithm=$1 seed=$2 steps=$3 every=$4
shift 4
case "$algorithm" in
  # the presets are the authors' values (configs/paper/omniglot_5w1s/<algorithm>.yaml)
  reptile|imaml|maml|fomaml|anil|metasgd) values=() ;;
  # the reference's HEAD config (omniglot_maml++-omniglot_1_8_0.1_64_5_0.json) and network: meta-batch 8,
  # 64-filter max-pool blocks with leaky ReLU; its cosine schedule spans the config's 100 epochs
  mamlpp) values=(model=conv4_maxpool model.hidden=64 model.activation=leaky_relu algorithm.meta_batch_size=8
                  algorithm.outer_schedule.T_max=50000) ;;
  *) echo "parity/metarun.sh: no parity values for algorithm $algorithm" >&2; exit 2 ;;
esac
METARUN=${METARUN:-.venv/bin/metarun}
exec "$METARUN" experiment=omniglot_5w1s "algorithm=$algorithm" "seed=$seed" "trainer.iterations=$steps" \
  "trainer.val_interval=$every" "trainer.checkpoint_interval=$every" "trainer.test_interval=$every" \
  trainer.val_tasks=20 trainer.evaluate_best=false trainer.num_threads=1 trainer.progress=false task.progress=false \
  "${values[@]}" "hydra.run.dir=parity/runs/$algorithm/metarun/seed$seed" "$@"  # (an override given wins)
