#!/usr/bin/env bash
# Run the test suite (sets everything up first on a fresh machine). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${MONAI_SSL_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
