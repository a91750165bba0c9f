"""Our SGLang export goes through SGLang's own parser (optional tier: ``pytest -m sglang``).

Needs sglang importable, e.g. in a separate environment::

    python -m venv /tmp/sglang-venv --system-site-packages
    /tmp/sglang-venv/bin/pip install --no-deps sglang orjson psutil pybase64 requests packaging pillow \
        starlette msgspec pydantic pyzmq tqdm ipython aiohttp triton multidict yarl propcache aiohappyeyeballs \
        aiosignal frozenlist
    /tmp/sglang-venv/bin/python -m pytest tests/test_sglang_parser.py -m sglang

What is replaced, and only that: SGLang's global config accessors (``get_exec``, ``get_parallel``, ``get_device``)
by plain values for a CPU run, and the model-class lookup (``ModelConfigForExpertLocation.from_model_config``,
which imports SGLang's whole model registry) by the value ``DeepseekV2ForCausalLM.get_model_config_for_expert_location``
returns for DeepSeek-V2-Lite (27 decoder layers, 64 routed experts, 1 group). The file reading, validation and map
building in ``compute_initial_expert_location_metadata`` / ``init_by_mapping`` run unmodified.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.sglang

try:
    import torch
    from sglang.srt.eplb import expert_location as el
except Exception as exc:  # noqa: BLE001 - any import failure means the optional tier cannot run here
    pytest.skip(f"sglang is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from placement.export import sglang as sglang_export  # noqa: E402
from traces import datasets  # noqa: E402
from tests.test_export import hot_replica_plan  # noqa: E402

G = 4


@pytest.fixture(scope="module")
def fit():
    return datasets.load().split_by_sequence(0.5, seed=0)[0]


def use_sglang_config(monkeypatch, path: str, redundant: int, a2a_backend: str) -> None:
    moe = SimpleNamespace(init_expert_location=path, ep_num_redundant_experts=redundant, ep_join_mode="none",
                          moe_a2a_backend=a2a_backend, ep_dispatch_algorithm="static", eplb_algorithm="auto")
    monkeypatch.setattr(el, "get_exec", lambda: SimpleNamespace(moe=moe))
    monkeypatch.setattr(el, "get_parallel", lambda: SimpleNamespace(ep_size=G, tp_size=G, nnodes=1,
                                                                    elastic_ep_initial_size=None,
                                                                    ep_join_rank_offset=0))
    monkeypatch.setattr(el, "get_device", lambda: SimpleNamespace(device="cpu"))
    monkeypatch.setattr(el.ModelConfigForExpertLocation, "from_model_config", staticmethod(
        lambda model_config: el.ModelConfigForExpertLocation(num_layers=27, num_logical_experts=64, num_groups=1)))


@pytest.mark.parametrize("redundant", [0, 4])
@pytest.mark.parametrize("a2a_backend", ["none", "deepep"])
def test_sglang_parses_our_export(fit, tmp_path, monkeypatch, redundant, a2a_backend):
    plan = hot_replica_plan(fit, G, redundant)
    text, hints = sglang_export.export(plan, "x")
    path = tmp_path / "init_expert_location.json"
    path.write_text(text)
    use_sglang_config(monkeypatch, str(path), redundant, a2a_backend)
    spg = plan.topology.slots_per_gpu
    for rank in range(G):
        meta = el.compute_initial_expert_location_metadata(model_config=None, moe_ep_rank=rank)
        assert meta is not None
        assert (meta.num_layers, meta.num_physical_experts, meta.num_logical_experts) == (27, 64 + redundant, 64)
        assert meta.num_local_physical_experts == spg
        p2l = meta.physical_to_logical_map.numpy()
        assert np.array_equal(p2l[plan.moe_layer_index], plan.phy2log)
        assert np.array_equal(p2l[0], np.arange(64 + redundant) % 64)
        l2p = meta.logical_to_all_physical_map.numpy()
        dispatch = meta.logical_to_rank_dispatch_physical_map.numpy()  # static dispatch: [layers, E]
        for l, d in enumerate(plan.moe_layer_index):
            slots_of = [set(np.flatnonzero(plan.phy2log[l] == e).tolist()) for e in range(64)]
            for e in range(64):
                found = {int(s) for s in l2p[d, e] if s >= 0}
                local = sorted(s for s in slots_of[e] if s // spg == rank)
                if a2a_backend != "none" and local:  # collapsed to this rank's own replica
                    assert found == {local[0]}
                else:  # the full replica list, exactly the plan's
                    assert found == slots_of[e]
                chosen = int(dispatch[d, e])
                assert chosen in slots_of[e]
                if local:  # a token on this rank is served by the local replica when there is one
                    assert chosen // spg == rank


def test_extra_keys_break_sglang(fit, tmp_path, monkeypatch):
    # why the export holds exactly one key: SGLang splats the dict into init_by_mapping
    import json

    plan = hot_replica_plan(fit, G, 0)
    data = json.loads(sglang_export.export(plan, "x")[0])
    data["moeplace"] = {"solver": "x"}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    use_sglang_config(monkeypatch, str(path), 0, "none")
    with pytest.raises(TypeError):
        el.compute_initial_expert_location_metadata(model_config=None, moe_ep_rank=0)
    assert torch is not None
