#!/usr/bin/env bash
# Every comparison of docs/parity.md not made yet, one after another on one thread, resumable: a run with
# results.json is skipped, a metarun run with a checkpoint resumes, a reference run that stopped starts again.
#
#   nohup bash parity/run_all.sh > parity/runs/run_all.log 2>&1 &     # ~14 CPU-hours for everything
#   ALGORITHMS="maml fomaml" SEEDS="0 1 2" STEPS=1000 EVERY=250 bash parity/run_all.sh
#
# The references' environments are the ones their READMEs build (L2L_PYTHON, MAMLPP_PYTHON, MAMLPP_REF).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
L2L_PYTHON=${L2L_PYTHON:-/work/envs/l2l/bin/python}
MAMLPP_PYTHON=${MAMLPP_PYTHON:-/work/envs/mamlpp/bin/python}
MAMLPP_REF=${MAMLPP_REF:-/work/refs/HowToTrainYourMAMLPytorch}
STEPS=${STEPS:-1000} EVERY=${EVERY:-250}
[ -f parity/data/omniglot_paper_5w1s.npz ] || .venv/bin/python parity/export_omniglot.py

metarun_run() {  # ALGORITHM SEED FOLDER [override ...]: parity/metarun.sh, or resume=, or nothing
  local algorithm=$1 seed=$2 folder=$3; shift 3
  if [ -f "$folder/results.json" ]; then return; fi
  if [ -f "$folder/checkpoints/last.pt" ]; then .venv/bin/metarun "resume=$folder"
  else bash parity/metarun.sh "$algorithm" "$seed" "$STEPS" "$EVERY" "$@" "hydra.run.dir=$folder"; fi
  echo "$(date +%T) metarun $folder rc=$?"
}

reference_run() {  # FOLDER PYTHON DRIVER [argument ...]: the reference from the start (it keeps no checkpoint), or nothing
  local folder=$1; shift
  if [ -f "$folder/results.json" ]; then return; fi
  rm -rf "$folder"
  "$@" --steps "$STEPS" --eval-every "$EVERY" --out "$folder"
  echo "$(date +%T) reference $folder rc=$?"
}

for a in ${ALGORITHMS:-maml fomaml anil metasgd mamlpp}; do
  for s in ${SEEDS:-0 1 2}; do
    if [ "$a" = mamlpp ]; then
      mamlpp=("$MAMLPP_PYTHON" parity/mamlpp/reference.py --ref "$MAMLPP_REF" --seed "$s")
      reference_run "parity/runs/mamlpp/reference/seed$s" "${mamlpp[@]}"
      # and on metarun's pixels (bright strokes on 0, not its own 1 - x)
      reference_run "parity/runs/mamlpp/reference-same-pixels/seed$s" "${mamlpp[@]}" --no-invert
    else
      test_steps=3; [ "$a" = metasgd ] && test_steps=1  # Meta-SGD is tested after its one step (paper, preset)
      reference_run "parity/runs/$a/reference/seed$s" "$L2L_PYTHON" parity/learn2learn/reference.py \
        --algorithm "$a" --seed "$s" --test-steps "$test_steps"
    fi
    if [ "$a" = anil ]; then  # ANIL's reference with batch norm per half, as metarun's
      reference_run "parity/runs/anil-split/reference/seed$s" "$L2L_PYTHON" parity/learn2learn/reference.py \
        --algorithm anil --anil-features split --seed "$s"
    fi
    metarun_run "$a" "$s" "parity/runs/$a/metarun/seed$s"
    if [ "$a" = mamlpp ]; then  # and with the reference's initialisation (docs/parity.md, MAML++)
      metarun_run "$a" "$s" "parity/runs/$a/metarun-xavier/seed$s" model.init=xavier
    else  # and on learn2learn's network (docs/parity.md, MAML)
      metarun_run "$a" "$s" "parity/runs/$a/metarun-l2lcnn/seed$s" model=custom \
        model._target_=parity.learn2learn.omniglot_cnn.OmniglotCNN
    fi
  done
done
