#!/usr/bin/env bash
# The main job on the embedded default: the whole pipeline on Fashion-MNIST with the pretrained
# cifar-resnet20 shipped in examples/assets (91.88% test accuracy, see fashion_resnet20.json).
#   attach -> train-branches -> sweep-threshold -> export, then the headline.
# Run it through `make demo`, which creates the environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${PTEENET_DEMO_OUT:-runs/demo}
EPOCHS=${PTEENET_DEMO_EPOCHS:-4}
LIMIT=${PTEENET_DEMO_LIMIT:-20000}
mkdir -p "$OUT"

# Fashion-MNIST: Debian's package where apt is available (works offline), else torchvision downloads it.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "note: could not install dataset-fashion-mnist; torchvision will try to download Fashion-MNIST" >&2
fi

start=$(date +%s)
# The defaults: a pooled MLP head after every block (9 on ResNet-20), each on its own.
pteenet attach cifar-resnet20 --weights examples/assets/fashion_resnet20.safetensors \
  --input-size 1,28,28 --mean 0.2860 --std 0.3530 -o "$OUT/attached.safetensors"
# Heads learn from the backbone's softmax at temperature 2; features are cached once (no
# augmentation), and 20,000 of the 54,000 training images keep the demo within minutes on 2 CPU
# cores.
pteenet train-branches "$OUT/attached.safetensors" -o "$OUT/trained.safetensors" --data fashion-mnist \
  --no-augment --cache-features --limit "$LIMIT" --epochs "$EPOCHS" --lr 2e-3 --json > "$OUT/train.json"
# Thresholds (and which exits decide at all) are chosen on the held-out calibration split, priced in
# predicted time at batch 1 on this machine, at most 1 point below the backbone there (certified),
# and the chosen setting is re-measured on the test split.
pteenet sweep-threshold "$OUT/trained.safetensors" -o "$OUT/sweep" --max-drop 1.0 --select-exits \
  --write "$OUT/tuned.safetensors" --json > "$OUT/sweep.json"
pteenet export "$OUT/tuned.safetensors" -o "$OUT/export" --force --json > "$OUT/export.json"
python examples/headline.py "$OUT" --seconds $(( $(date +%s) - start )) --save "$OUT/headline.json"
