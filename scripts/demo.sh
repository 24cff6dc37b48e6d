#!/usr/bin/env bash
# The main job: train the article's CNN (seed-cnn-fast recipe) on Fashion-MNIST, then write its report.
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; if it is missing we install it
# when we can (root + apt-get), and otherwise fall back to scikit-learn's bundled digits.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DIR=/usr/share/datasets/fashion-mnist
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
extra=()
if [ ! -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "demo: installing Debian's dataset-fashion-mnist (about 30 MB)..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null || true
  fi
fi
if [ ! -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "demo: Fashion-MNIST not found in $DIR (install it with: sudo apt-get install dataset-fashion-mnist); using scikit-learn's digits, upscaled to 28x28, instead"
  extra=(--set data.name=digits --set data.image_size=28 --set train.epochs=20 --set train.batch_size=64)
fi
"$PY" -m nnlab train seed-cnn-fast --out "$RUN" "${extra[@]}" "$@"
echo "demo: the run's report (open it in a browser):"
"$PY" -m nnlab report "$RUN"
