"""DeepSpeed ZeRO-3 with parameter and optimizer offload on the CPU, our pool as its pinned
memory. Runs in a subprocess (torch.distributed state stays out of the test process)."""

import json
import subprocess
import sys
import textwrap

import pytest
from apportion_offload.zero import zero_config

pytestmark = pytest.mark.deepspeed


def test_configs_from_placements():
    cfg = zero_config("nvme", largest_param_numel=28_311_552, nvme_path="/nvme/swap")
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "nvme"
    assert (
        z["offload_param"]["buffer_size"] >= 28_311_552
        and z["offload_param"]["buffer_size"] % (1 << 20) == 0
    )
    assert z["offload_optimizer"] == {
        "device": "nvme",
        "pin_memory": True,
        "nvme_path": "/nvme/swap",
        "buffer_count": 4,
        "fast_init": False,
    }
    assert cfg["aio"]["block_size"] == 1 << 20
    cxl = zero_config("cxl", largest_param_numel=10)
    assert "offload_param" not in cxl["zero_optimization"]
    assert cxl["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cxl["activation_checkpointing"]["cpu_checkpointing"] is True
    with pytest.raises(ValueError, match="nvme_path"):
        zero_config("nvme", largest_param_numel=10)
    with pytest.raises(ValueError, match="largest_param_numel"):
        zero_config("cpu", largest_param_numel=0)


def test_deepspeed_validates_our_config():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = zero_config("nvme", largest_param_numel=1 << 20, nvme_path="/tmp")
    z = DeepSpeedZeroConfig(**cfg["zero_optimization"])
    assert z.offload_param.device == "nvme" and z.offload_optimizer.device == "nvme"


STEP = textwrap.dedent("""
    import json, torch
    from apportion_offload.zero import init_single_process, pool_as_pinned_memory, zero_config
    init_single_process(port=29541)
    import deepspeed
    from apportion.config import ModelSpec
    from apportion.host import load_model
    from apportion_offload.pool import PinnedPool, PinnedPoolConfig

    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    model = loaded.model
    # the embedded model's first layer: real weights, a short step
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :32]
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss.item()
    largest = max(p.numel() for p in model.parameters())
    cfg = zero_config("params=cpu,optimizer=cpu", largest_param_numel=largest)
    pool = PinnedPool(PinnedPoolConfig(cap_bytes=2 << 30))
    with pool_as_pinned_memory(pool) as backend:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        losses = []
        for _ in range(2):
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
    print(json.dumps({"plain": plain, "losses": losses, "stage": engine.zero_optimization_stage(),
                      "offload_param": bool(engine.zero_offload_param()),
                      "offload_optimizer": bool(engine.zero_offload_optimizer()),
                      "pinned_requests": backend.pinned_requests,
                      "pool_peak": pool.stats().peak_bytes,
                      "params": sum(p.ds_numel for p in model.parameters())}))
""")


def test_zero3_offload_step_on_our_pool():
    proc = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stage"] == 3 and out["offload_param"] and out["offload_optimizer"]
    assert out["losses"][0] == pytest.approx(
        out["plain"], rel=1e-4
    )  # partitioned + pinned in our pool: same model
    assert out["losses"][1] < out["losses"][0]  # the step trained it
    assert out["pinned_requests"] > 0
    assert out["pool_peak"] >= 4 * out["params"]  # at least the fp32 partitions sat in the pool
