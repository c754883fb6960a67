#!/usr/bin/env bash
# Do the lower bounds in pyproject.toml hold? Installs seedselect[test] into a fresh environment with every direct
# dependency at the lowest version its bound allows (uv's --resolution lowest-direct), torch pinned to the one
# installed here (so no CUDA build is downloaded), then runs the demo and the quick loop there (`--all`: every test).
# Run it after raising a bound or using a newer library API. Needs uv (`pip install uv`) and the package registry.
#
#   bash scripts/check_lowest.sh [--all]     # about 2 min with uv's cache warm (--all: 13 min), 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || { echo "check_lowest.sh needs uv: pip install uv" >&2; exit 2; }
PY=${PYTHON:-python3}
torch=$("$PY" -c "import torch; print(torch.__version__)")
env=$(mktemp -d)/lowest
trap 'rm -rf "$(dirname "$env")"' EXIT
# this machine's own wheels and indexes, as pip is configured to use them
sources=(--index-strategy unsafe-best-match)
for link in ${PIP_FIND_LINKS:-}; do sources+=(--find-links "$link"); done
for index in $("$PY" -m pip config get global.extra-index-url 2>/dev/null || true); do
  sources+=(--extra-index-url "$index")
done
uv venv -q -p "$PY" "$env"
VIRTUAL_ENV=$env uv pip install -q --resolution lowest-direct "${sources[@]}" \
  --constraint <(echo "torch==$torch") ".[test]"
"$env/bin/python" - <<'EOF'
import importlib.metadata as metadata
from packaging.requirements import Requirement
names = dict.fromkeys(Requirement(line).name for line in metadata.requires("seedselect"))
print("lowest:", ", ".join(f"{name} {metadata.version(name)}" for name in names))
EOF
demo=$(mktemp -d)
(cd "$demo" && "$env/bin/seedselect" optimize runtime.progress=false hydra.run.dir=run | tail -4)
rm -rf "$demo"
if [ "${1:-}" = "--all" ]; then
  "$env/bin/python" -m pytest -q -p no:cacheprovider
else
  "$env/bin/python" -m pytest -q -p no:cacheprovider -m "not slow"
fi
