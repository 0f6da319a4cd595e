#!/usr/bin/env bash
# Run vicd's tests: installs what they need first (idempotent), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install.sh --no-start
.venv/bin/ruff check vicd api plugins tests
exec .venv/bin/python -m pytest -q -ra "$@"
