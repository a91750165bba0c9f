#!/usr/bin/env bash
# Build a side environment for the optional SGLang tier (tests/test_sglang_parser.py, the SGLang part of
# tests/test_online_stacks.py) from a clean machine: no GPU needed. SGLang is installed without its dependency
# tree (CUDA kernels); the modules its EPLB and expert-location code imports are installed next to it.
#
#   scripts/tier-sglang.sh [SGLANG_VERSION] [ENV_DIR]      default: 0.5.23, /work/side-envs/sglang-<version>
#   ENV_DIR/bin/python -m pytest tests/test_sglang_parser.py tests/test_online_stacks.py -m sglang
#
# Torch: a CPU build; TORCH_WHEEL names a local wheel (default: /opt/wheels/torch-2.13.0+cpu-*.whl when it exists),
# else torch comes from PyPI.
set -euo pipefail
VERSION="${1:-0.5.23}"
ENV_DIR="${2:-/work/side-envs/sglang-$VERSION}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

"$PY" -m venv "$ENV_DIR"
PIP="$ENV_DIR/bin/pip"
"$PIP" install -q --upgrade pip
WHEEL="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}"
if [ -n "$WHEEL" ]; then "$PIP" install -q "$WHEEL"; else "$PIP" install -q torch; fi
"$PIP" install -q -e "$ROOT[dev]"
"$PIP" install -q --no-deps "sglang==$VERSION"
"$PIP" install -q orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm ipython \
    aiohttp triton multidict yarl propcache aiohappyeyeballs aiosignal frozenlist
"$ENV_DIR/bin/python" - <<'PY'
import sglang
from sglang.srt.eplb import eplb_algorithms, expert_location  # noqa: F401
print(f"sglang {sglang.__version__}: EPLB importable")
PY
