#!/usr/bin/env bash
# One idempotent setup for a fresh Debian machine (and CI): system packages, a venv, our package.
# GPU users: create .venv yourself with your CUDA torch first; this script then leaves torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: tesseract (independent OCR oracle for document data) and real fonts for page rendering.
need_apt=()
command -v tesseract >/dev/null 2>&1 || need_apt+=(tesseract-ocr tesseract-ocr-eng)
[ -d /usr/share/fonts/truetype/noto ] || need_apt+=(fonts-noto-core)
[ -d /usr/share/fonts/truetype/liberation2 ] || need_apt+=(fonts-liberation2)
[ -d /usr/share/fonts/truetype/dejavu ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$PY" -m venv .venv; }
# torch first and exactly: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
.venv/bin/python -c "import torch" 2>/dev/null || { echo "[setup] installing torch (CPU build)"; .venv/bin/pip install -q torch==2.13.0; }
if [ ! -f .venv/.vlmcook-installed ] || [ pyproject.toml -nt .venv/.vlmcook-installed ]; then
  echo "[setup] installing vlmcook and extras"
  .venv/bin/pip install -q -e ".[all]"
  touch .venv/.vlmcook-installed
fi
echo "[setup] ok"
