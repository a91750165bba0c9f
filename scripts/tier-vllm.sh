#!/usr/bin/env bash
# Build a side environment for the optional vLLM tier (tests/test_vllm_plugin.py, tests/test_online_stacks.py)
# from a clean machine: no GPU needed. vLLM's wheel is installed without its dependency tree (which pulls CUDA
# packages); the modules its EPLB and config imports need are installed next to it.
#
#   scripts/tier-vllm.sh [VLLM_VERSION] [ENV_DIR]      default: 0.34.0, /work/side-envs/vllm-<version>
#   ENV_DIR/bin/python -m pytest tests/test_vllm_plugin.py tests/test_online_stacks.py -m 'not sglang'
#
# Torch: a CPU build. Set TORCH_WHEEL to a local CPU wheel (default: /opt/wheels/torch-2.13.0+cpu-*.whl when it
# exists); otherwise torch comes from PyPI's CPU index route given in TORCH_INDEX (default: PyPI's torch).
set -euo pipefail
VERSION="${1:-0.34.0}"
ENV_DIR="${2:-/work/side-envs/vllm-$VERSION}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

"$PY" -m venv "$ENV_DIR"
PIP="$ENV_DIR/bin/pip"
"$PIP" install -q --upgrade pip
WHEEL="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}"
if [ -n "$WHEEL" ]; then "$PIP" install -q "$WHEEL"; else "$PIP" install -q torch; fi
"$PIP" install -q -e "$ROOT[dev]"          # moeplace itself (registers the vllm.general_plugins entry point)
"$PIP" install -q --no-deps "vllm==$VERSION"
"$PIP" install -q psutil cbor2 aiohttp openai openai-harmony multidict yarl propcache aiohappyeyeballs aiosignal \
    frozenlist pybase64 cachetools msgspec uvloop prometheus_client xgrammar apache-tvm-ffi fastapi starlette \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions partial-json-parser llguidance einops \
    urllib3 requests cloudpickle py-cpuinfo
"$ENV_DIR/bin/python" - <<'PY'
import vllm, torch
from vllm.distributed.eplb import eplb_state  # noqa: F401
print(f"vllm {vllm.__version__} with torch {torch.__version__}: EPLB importable")
PY
