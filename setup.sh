#!/usr/bin/env bash
# bhvit set-up: torch 2.13.0 (the CPU build where pip's package source holds it), the
# package with its test tools, and (where apt is available) Debian's Fashion-MNIST
# package for the default training job.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "installed dataset-fashion-mnist"
  else
    echo "note: could not install dataset-fashion-mnist with apt; pass --data-dir to bhvit train" >&2
  fi
fi
# editable_mode=compat puts the checkout on sys.path, so that a script in the folder that
# holds the clone (a folder named bhvit beside it) still imports the installed package.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[dev]" \
  --config-settings editable_mode=compat
python -c "import bhvit, torch; print('bhvit', bhvit.__version__, 'torch', torch.__version__)"
