#!/usr/bin/env bash
# See README.md "Recipes for real hardware": the paper's runs (SFT -> reward model -> PPO, and DPO) on GPUs.
#
#   bash benchmark/recipes/tldr.sh 1b 8          # Pythia-1B on 8 GPUs (the paper's set-up), the paper's four seeds
#   bash benchmark/recipes/tldr.sh 1b 1          # Pythia-1B on 1 GPU: same global batches through accumulation
#   bash benchmark/recipes/tldr.sh 2.8b 8        # SFT, reward model, DPO, and PPO sharded with --fsdp
#   bash benchmark/recipes/tldr.sh 6.9b 8        # every stage sharded with --fsdp
#   SEEDS="44413" bash benchmark/recipes/tldr.sh 1b 8   # one seed
#   DRY_RUN=1 bash benchmark/recipes/tldr.sh 6.9b 8     # print the commands instead of running them
#
# Batch sizes are the paper's and global (independent of the GPU count); only the per-GPU micro-batches change.
# Models land in models/{size}/{stage}__{seed}; each stage reads the previous stage's folder.
set -euo pipefail
usage="usage: tldr.sh SIZE GPUS (SIZE 1b, 2.8b or 6.9b; GPUS 8 or 1)"
size=${1:?$usage}
gpus=${2:?$usage}
seeds=${SEEDS:-"44413 55513 66613 77713"}  # the N+ paper's seeds
cd "$(dirname "$0")/../.."
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$@"; else "$@"; fi; }

case "$size" in
  1b)   base=EleutherAI/pythia-1b-deduped;   sft_micro=16; rm_micro=8; dpo_micro=8; ppo_micro=16; ppo_rollout=64 ;;
  2.8b) base=EleutherAI/pythia-2.8b-deduped; sft_micro=4;  rm_micro=4; dpo_micro=2; ppo_micro=4;  ppo_rollout=32 ;;
  6.9b) base=EleutherAI/pythia-6.9b-deduped; sft_micro=2;  rm_micro=2; dpo_micro=1; ppo_micro=2;  ppo_rollout=16 ;;
  *) echo "size must be 1b, 2.8b or 6.9b, got $size" >&2; exit 2 ;;
esac
case "$gpus" in
  1) launch="python" ;;
  8) launch="torchrun --nproc-per-node 8" ;;
  *) echo "gpus must be 8 or 1, got $gpus" >&2; exit 2 ;;
esac
# Weights, gradients and AdamW states in fp32 take 16 bytes per trained parameter on every GPU (DDP replicates them):
# 6.9B does not fit an 80 GB GPU for any stage, and PPO (policy + value trained, reference + reward frozen) does not
# fit from 2.8B on. --fsdp shards them over the GPUs (README.md "Multi-GPU and memory"): PPO from 2.8B on, every
# stage at 6.9B; it needs several GPUs.
if [ "$size" = "6.9b" ] && [ "$gpus" = "1" ]; then
  echo "6.9b needs --fsdp over several GPUs for every stage (SFT alone is about 110 GB on one GPU)" >&2; exit 2
fi
shard=$([ "$size" = "6.9b" ] && echo "--fsdp" || echo "")             # SFT, reward model and DPO
ppo_shard=$([ "$size" = "1b" ] && echo "" || echo "--fsdp")            # PPO: the four models sharded from 2.8B on

for seed in $seeds; do
  out=models/$size
  run $launch sft.py --seed "$seed" --base-model "$base" --local-micro-batch-size "$sft_micro" \
      --output-dir "$out/sft__$seed" $shard
  run $launch reward_model.py --seed "$seed" --sft-model-path "$out/sft__$seed" --local-micro-batch-size "$rm_micro" \
      --output-dir "$out/reward_model__$seed" $shard
  run $launch dpo.py --seed "$seed" --sft-model-path "$out/sft__$seed" --local-micro-batch-size "$dpo_micro" \
      --output-dir "$out/dpo__$seed" $shard
  if [ "$size" = "1b" ] || [ "$gpus" = "8" ]; then
    run $launch ppo_tldr.py --seed "$seed" --sft-model-path "$out/sft__$seed" \
        --reward-model-path "$out/reward_model__$seed" --total-episodes 1000000 \
        --local-micro-batch-size "$ppo_micro" --local-rollout-forward-batch-size "$ppo_rollout" \
        --output-dir "$out/ppo__$seed" $ppo_shard
  else
    echo "skipping PPO at $size on 1 GPU: it needs --fsdp over several GPUs (about 111 GB under DDP)" >&2
  fi
done
