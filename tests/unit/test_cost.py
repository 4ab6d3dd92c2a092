"""Cost accounting: measured parameters and MACs against the DiT paper's table, the meta and CPU
counts agreeing, methods applied, and the ``denoiselab cost`` command."""
from __future__ import annotations

import json

import pytest

from trainers.config import load_config
from trainers.cost import run_cost

# DiT paper (Peebles & Xie 2023), Table 4: 256x256 images = 4x32x32 latents, 1,000 classes, patch 2.
# Its "Gflops" are GMACs (1 MAC = 2 FLOPs).
DIT_PAPER = {"DiT-S/2": (33e6, 6.06e9), "DiT-B/2": (130e6, 23.01e9), "DiT-L/2": (458e6, 80.71e9),
             "DiT-XL/2": (675e6, 118.64e9)}


@pytest.mark.parametrize("name", list(DIT_PAPER))
def test_dit_params_and_macs_match_the_paper(name: str) -> None:
    params, macs = DIT_PAPER[name]
    cost = run_cost(load_config({"model": {"name": name}}), channels=4, image_size=32, num_classes=1000)
    assert cost.device == "meta"
    assert abs(cost.params / params - 1) < 0.03, cost.params
    assert abs(cost.macs / macs - 1) < 0.02, cost.macs
    assert cost.flops == 2 * cost.macs and cost.trainable_params == cost.params


def test_meta_and_cpu_counts_agree() -> None:
    cfg = load_config({"model": {"name": "DiT-N/2"}})
    meta = run_cost(cfg, channels=1, image_size=8, num_classes=10, device="meta")
    cpu = run_cost(cfg, channels=1, image_size=8, num_classes=10, device="cpu")
    assert (meta.params, meta.flops) == (cpu.params, cpu.flops) and cpu.flops > 0


def test_dtr_costs_no_parameters_and_no_macs() -> None:
    vanilla = run_cost(load_config({"model": {"name": "DiT-S/2"}}), channels=4, image_size=32, num_classes=1000)
    dtr = run_cost(load_config({"model": {"name": "DiT-S/2"}, "methods": {"dtr": {}}}), channels=4, image_size=32,
                   num_classes=1000)
    assert (dtr.params, dtr.macs) == (vanilla.params, vanilla.macs)


def test_cost_command_prints_a_table_and_json(capsys) -> None:
    from orchestrator.cli import main
    assert main(["cost", "orchestrator/experiments/quickstart.yaml"]) == 0
    table = capsys.readouterr().out
    assert "DiT-N/2 (dtr+ant)" in table and "1x8x8, 10 classes" in table and "1 MAC = 2 FLOPs" in table
    assert main(["cost", "--set", "model.name=DiT-XL/2", "--input", "4x32x32", "--classes", "1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "DiT-XL/2" and out["input"] == "4x32x32" and out["classes"] == 1000
    assert out["flops"] == 2 * out["macs"] and abs(out["macs"] / 118.64e9 - 1) < 0.02
    assert main(["cost", "--input", "4x32"]) == 2
    assert "--input: '4x32' is not CxHxW" in capsys.readouterr().err
