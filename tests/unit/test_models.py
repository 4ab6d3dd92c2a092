"""DiT: shapes for every size, parameter counts against the paper, adaLN-Zero, the registry."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import randomize_
from trainers.config import ModelConfig
from trainers.errors import ConfigError
from trainers.models import SIZES, DiT, build_model, model_spec
from trainers.models.dit import timestep_embedding


def _spec(name: str, image_size: int = 8, channels: int = 1, num_classes: int = 10, learn_sigma: bool = True, **kw):
    return model_spec(ModelConfig(name=name, arch=kw), image_size=image_size, channels=channels,
                      num_classes=num_classes, learn_sigma=learn_sigma)


def _inputs(n: int, channels: int, size: int, num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, size, size), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen) if num_classes else None
    return x, t, y


@pytest.mark.parametrize("size", ["N", "T"])
@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes_small_sizes(size: str, patch: int, learn_sigma: bool) -> None:
    spec = _spec(f"DiT-{size}/{patch}", image_size=8, channels=3, num_classes=4, learn_sigma=learn_sigma)
    hidden, depth, heads = SIZES[size]
    assert (spec.hidden, spec.depth, spec.heads, spec.patch) == (hidden, depth, heads, patch)
    model = randomize_(build_model(spec))
    x, t, y = _inputs(3, 3, 8, 4)
    out = model(x, t, y)
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert torch.isfinite(out).all()
    assert spec.num_tokens == (8 // patch) ** 2 == model.pos_embed.shape[1]


# DiT paper (Peebles & Xie 2023), Table 1 / 4: parameters for 256x256 images = 32x32x4 latents,
# 1000 classes, learned sigma.
PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_parameter_counts_match_the_paper(size: str) -> None:
    spec = _spec(f"DiT-{size}/2", image_size=32, channels=4, num_classes=1000, learn_sigma=True)
    with torch.device("meta"):
        model = build_model(spec)
    assert len(model.blocks) == SIZES[size][1]
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.02, count
    assert spec.num_tokens == 256                                   # M = 256 tokens (256 px images, 32x32x4 latents, patch 2)
    # Shapes propagate on the meta device without allocating memory.
    x = torch.empty((2, 4, 32, 32), device="meta")
    out = model(x, torch.zeros(2, dtype=torch.long, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, 32, 32)


def test_unconditional_model() -> None:
    spec = _spec("DiT-N/2", num_classes=0)
    model = randomize_(build_model(spec))
    assert model.y_embedder is None
    x, t, _ = _inputs(4, 1, 8, 0)
    out = model(x, t, None)
    assert out.shape == (4, 2, 8, 8)
    cond = randomize_(build_model(_spec("DiT-N/2", num_classes=10)))
    assert cond.y_embedder.num_embeddings == 11                   # + the null class for CFG
    extra = sum(p.numel() for p in cond.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == 11 * spec.hidden


def test_conditional_model_uses_labels_and_null_class() -> None:
    model = randomize_(build_model(_spec("DiT-N/2", num_classes=10)))
    x, t, _ = _inputs(2, 1, 8, 10)
    a = model(x, t, torch.tensor([1, 2]))
    b = model(x, t, torch.tensor([3, 4]))
    assert not torch.allclose(a, b)
    # y=None on a conditional model means "no class": the null embedding.
    assert torch.equal(model(x, t, None), model(x, t, torch.tensor([10, 10])))


@pytest.mark.parametrize("name", ["DiT-N/2", "DiT-T/4"])
def test_adaln_zero_initial_output_is_exactly_zero(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(_spec(name, num_classes=10))
    x, t, y = _inputs(5, 1, 8, 10)
    assert torch.count_nonzero(model(x, t, y)) == 0
    # ... and every block starts as the identity.
    h = torch.randn(5, model.spec.num_tokens, model.spec.hidden)
    c = model.condition(t, y)
    for block in model.blocks:
        assert torch.equal(block(h, c, t), h)


def test_same_seed_same_weights() -> None:
    spec = _spec("DiT-N/2")
    torch.manual_seed(3)
    a = build_model(spec)
    torch.manual_seed(3)
    b = build_model(spec)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_timestep_embedding() -> None:
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))    # cos(0) | sin(0)
    assert timestep_embedding(t, 7).shape == (3, 7)                         # odd width padded


@pytest.mark.parametrize("bad", ["DiT-Q/2", "DiT-S/3", "dit-s/2", "UNet", "DiT-XL/16", ""])
def test_registry_rejects_unknown_names(bad: str) -> None:
    with pytest.raises(ConfigError, match="model.name") as err:
        _spec(bad)
    assert "DiT-<size>/<patch>" in str(err.value)


def test_registry_rejects_patch_not_dividing_image() -> None:
    with pytest.raises(ConfigError, match="patch 4 does not divide the image size 10"):
        _spec("DiT-N/4", image_size=10)
    with pytest.raises(ConfigError, match="patch 8"):
        _spec("DiT-N/8", image_size=12)
    assert _spec("DiT-N/8", image_size=8).num_tokens == 1


def test_registry_size_overrides() -> None:
    spec = _spec("DiT-N/2", hidden_size=48, depth=2, num_heads=3)
    assert (spec.hidden, spec.depth, spec.heads) == (48, 2, 3)
    model = build_model(spec)
    assert len(model.blocks) == 2 and isinstance(model, DiT)
    with pytest.raises(ConfigError, match="model.arch.hidden_size"):
        _spec("DiT-N/2", hidden_size=50, num_heads=4)
