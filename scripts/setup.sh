#!/usr/bin/env bash
# Set up monai_ssl on a fresh machine: a virtual environment in .venv with PyTorch and the package.
# Without an NVIDIA GPU it installs the CPU build of PyTorch (never a multi-GB CUDA build).
# Re-running is cheap: nothing is reinstalled while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MONAI_SSL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${MONAI_SSL_TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

stamp="$VENV/.monai_ssl_installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch-$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import monai_ssl" 2>/dev/null; then
    exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
        "${PIP[@]}" install -q "torch==$TORCH_VERSION"
    else
        echo "[setup] no GPU: installing the CPU build torch==$TORCH_VERSION+cpu (its dependencies come with the package below)"
        if ! "${PIP[@]}" install -q --no-deps --retries 1 --timeout 20 "torch==$TORCH_VERSION+cpu" \
                --extra-index-url https://download.pytorch.org/whl/cpu; then
            echo "[setup] could not find torch==$TORCH_VERSION+cpu (PyTorch's CPU index or a local wheel)." >&2
            echo "[setup] install a CPU torch into $VENV yourself, then re-run; refusing to pull a multi-GB CUDA build." >&2
            exit 1
        fi
    fi
fi
echo "[setup] installing monai_ssl and its dependencies (pip install -e .[test])"
# keep the torch just installed: without the pin, a dependency asking for a newer torchvision
# makes pip replace it with a newer (CUDA) torch
installed_torch="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')"
"${PIP[@]}" install -q -e ".[test]" -c <(echo "torch==$installed_torch")
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, monai, monai_ssl; print(f"torch {torch.__version__}, monai {monai.__version__}, monai_ssl {monai_ssl.__version__}")')"
