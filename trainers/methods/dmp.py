"""DMP: Diffusion Model Patching via Mixture-of-Prompts (Ham et al., AAAI 2025, arXiv 2405.17825;
docs/methods.md, "DMP").

A converged backbone is frozen; a pool of learnable prompts is added to the patch tokens before
each patched block, mixed by one gate shared by all blocks and conditioned on the timestep (the
conditioning vector ``c`` plus the block index):

    z_l = [c, l] · W_g + b_g                          (+ ε ⊙ (softplus(c · W_n) + 0.01) in training)
    g_l = softmax over the K = ⌊ρM⌋ largest entries of z_l, 0 elsewhere      g_l ∈ Δ^M per sample
    x   ← x + g_l[:, :, None] ⊙ P_l[None]              prompt m is added to token m ("add" mode)

P, W_g, b_g and W_n start at zero, so the patched model equals the pretrained one exactly at
step 0. The balancing loss is λ_imp · CV²(Σ_l g_l) plus, when ρ < 1, λ_load · the load term.
Modes: ``add`` (the method), ``prepend`` (M gated tokens in front of the sequence, rewritten
before each patched block, dropped before the output layer), and the paper's two baselines,
``prompt_tuning`` (prompts added without a gate) and ``fine_tuning`` (no patch, every weight
trained).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.errors import ConfigError
from trainers.methods.protocols import BuildContext, Contribution, ParamGroup, TransformBase
from trainers.methods.registry import MethodDescriptor, register
from trainers.models.contract import BlockAdapter, require_token_backbone

__all__ = ["DmpConfig", "PromptPatch", "DmpTransform", "DmpBalance", "GateUsage", "top_k_gate", "cv_squared",
           "load_probability", "patch_overhead", "gate_usage", "DESCRIPTOR"]


@dataclass(frozen=True)
class DmpConfig:
    mode: Literal["add", "prepend", "prompt_tuning", "fine_tuning"] = "add"
    depth: Optional[int] = None        # patched blocks L' (the first L'); null = all (the paper)
    topk: float = 1.0                  # ρ: the gate keeps ⌊ρM⌋ of the M prompts
    init: Literal["zero", "xavier"] = "zero"
    lr: float = 1e-4                   # prompts
    gate_lr_scale: float = 10.0        # gate and noise projection: lr · gate_lr_scale
    importance_weight: float = 1.0     # λ_imp
    load_weight: float = 1.0           # λ_load, only when ρ < 1
    load_form: Literal["cv2", "sum"] = "cv2"   # ρ < 1: Shazeer's CV²(load) (ours) or the plain sum
    noise: bool = True                 # noisy gating during training
    num_prompts: Optional[int] = None  # prepend only (add needs one prompt per token); null = tokens
    seed: int = 0                      # noisy gating

    def __post_init__(self) -> None:
        if not 0.0 < self.topk <= 1.0:
            raise ConfigError("methods.dmp.topk: must be in (0, 1]; the paper uses 1.0")
        if self.depth is not None and self.depth < 1:
            raise ConfigError("methods.dmp.depth: must be >= 1, or null for every block")
        if self.lr <= 0 or self.gate_lr_scale <= 0:
            raise ConfigError("methods.dmp.lr/gate_lr_scale: must be > 0 (paper: 1e-4, 10)")
        if self.importance_weight < 0 or self.load_weight < 0:
            raise ConfigError("methods.dmp.importance_weight/load_weight: must be >= 0 (paper: 1, 1)")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError("methods.dmp.num_prompts: must be >= 1")


# ------------------------------------------------------------------------------ pure functions
def top_k_gate(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the ``k`` largest logits of each row, zero elsewhere: [N, M] -> [N, M]."""
    if k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    kept, idx = logits.topk(k, dim=-1)                                             # [N, k]
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(kept, dim=-1))


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation over every entry: Var(v) / (Mean(v)² + eps)."""
    v = v.float().flatten()
    if v.numel() < 2:
        return torch.zeros((), device=v.device)
    return v.var() / (v.mean() ** 2 + eps)


def load_probability(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al. (2017)'s smooth load: P(prompt m stays in the top ``k`` under fresh noise)
    for every sample and prompt, [N, M]. Needs k < M."""
    top, _ = noisy.topk(k + 1, dim=-1)                                             # [N, k+1]
    threshold_if_in = top[:, k:k + 1]                                              # (k+1)-th largest
    threshold_if_out = top[:, k - 1:k]                                             # k-th largest
    is_in = noisy > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_in = normal.cdf((clean - threshold_if_in) / noise_std)
    prob_out = normal.cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_in, prob_out)


# ------------------------------------------------------------------------------------ module
class PromptPatch(BlockAdapter):
    """Prompt pool P [L', M, D], the shared gate W_g [(D+1) → M] and the noise projection W_n."""

    def __init__(self, cfg: DmpConfig, width: int, depth: int, num_prompts: int):
        super().__init__()
        self.mode, self.depth, self.num_prompts = cfg.mode, depth, num_prompts
        self.k = max(1, math.floor(cfg.topk * num_prompts + 1e-9))
        gated = cfg.mode in ("add", "prepend")
        self.prompts = nn.Parameter(torch.zeros(depth, num_prompts, width))      # [L', M, D]
        # only what the forward pass uses exists (DDP requires every parameter to get a gradient)
        self.gate = nn.Linear(width + 1, num_prompts) if gated else None          # [c, l] -> z
        self.noise = nn.Linear(width, num_prompts, bias=False) if gated and cfg.noise else None
        if cfg.init == "xavier":
            for block in self.prompts.data:
                nn.init.xavier_uniform_(block)
        for linear in (self.gate, self.noise):
            if linear is not None:
                (nn.init.xavier_uniform_ if cfg.init == "xavier" else nn.init.zeros_)(linear.weight)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        self._generator: Optional[torch.Generator] = None
        self._seed: Optional[int] = None
        self.records: list[dict[str, torch.Tensor]] = []

    def reseed(self, seed: int) -> None:
        self._seed, self._generator = seed, None

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device)
            self._generator.manual_seed(self._seed if self._seed is not None else 0)
        return torch.randn(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def logits(self, source: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(noisy logits, clean logits, noise std or None) of block ``index``, each [N, M]."""
        depth_feature = torch.full((source.shape[0], 1), float(index), device=source.device, dtype=source.dtype)
        clean = self.gate(torch.cat([source, depth_feature], dim=1))                 # [N, M]
        if not self.training or self.noise is None:
            return clean, clean, None
        std = F.softplus(self.noise(source)) + 0.01                                  # [N, M]
        return clean + self._noise(clean) * std, clean, std

    def gates(self, source: torch.Tensor, index: int) -> torch.Tensor:
        """g_l [N, M]: top-k softmax of the (noisy in training) gate logits; recorded in training."""
        noisy, clean, std = self.logits(source, index)
        g = top_k_gate(noisy, self.k)
        if self.training and torch.is_grad_enabled():
            record = {"gates": g}
            if std is not None and self.k < self.num_prompts:
                record["load"] = load_probability(clean, noisy, std, self.k)
            self.records.append(record)
        return g

    def enter(self, x, cond):
        self.records = []                                     # gates of this forward pass only
        if self.mode != "prepend":
            return x
        return torch.cat([x.new_zeros(x.shape[0], self.num_prompts, x.shape[2]), x], dim=1)

    def forward_block(self, index, x, cond, inner):
        if index >= self.depth:
            return inner(x)
        if self.mode == "prompt_tuning":
            return inner(x + self.prompts[index].to(x.dtype))
        if self.mode == "add":
            g = self.gates(cond.c.float(), index)                                     # [N, M]
            return inner(x + (g[:, :, None] * self.prompts[index][None]).to(x.dtype))
        g = self.gates(cond.t_emb.float(), index)                                     # prepend: t only
        tokens = (g[:, :, None] * self.prompts[index][None]).to(x.dtype)              # [N, M, D]
        return inner(torch.cat([tokens, x[:, self.num_prompts:]], dim=1))

    def exit(self, x, cond):
        return x[:, self.num_prompts:] if self.mode == "prepend" else x

    def take_records(self) -> list[dict[str, torch.Tensor]]:
        records, self.records = self.records, []
        return records


class DmpTransform(TransformBase):
    name = "dmp"

    def __init__(self, cfg: DmpConfig):
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        require_token_backbone(model, "methods.dmp")
        cfg, blocks, tokens = self.cfg, len(model.blocks), model.num_tokens
        depth = blocks if cfg.depth is None else cfg.depth
        if depth > blocks:
            raise ConfigError(f"methods.dmp.depth: {depth} exceeds the model's {blocks} blocks")
        prompts = cfg.num_prompts or tokens
        if cfg.mode in ("add", "prompt_tuning") and prompts != tokens:
            raise ConfigError(f"methods.dmp.num_prompts: {cfg.mode} mode adds prompt m to token m, so the pool "
                              f"must hold one prompt per token ({tokens} for this model and data), not "
                              f"{prompts}; leave it unset or use mode: prepend")
        model.add_adapter("dmp", PromptPatch(cfg, model.width, depth, prompts))
        return model

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        patch = model.adapters["dmp"]
        gate = [p for m in (patch.gate, patch.noise) if m is not None for p in m.parameters()]
        groups = [ParamGroup("dmp_prompts", [patch.prompts], lr=self.cfg.lr, weight_decay=0.0, ema=False)]
        if gate:
            groups.append(ParamGroup("dmp_gate", gate, lr=self.cfg.lr * self.cfg.gate_lr_scale, weight_decay=0.0,
                                     ema=False))
        return groups

    def begin_step(self, model: nn.Module, step: int, rank: int) -> None:
        model.adapters["dmp"].reseed((self.cfg.seed * 1_000_003 + step) * 1_009 + rank)


class DmpBalance:
    """The prompt balancing loss: λ_imp · CV²(importance) (+ λ_load · load when ρ < 1)."""

    name = "dmp_balance"

    def __init__(self, cfg: DmpConfig):
        self.cfg = cfg

    def __call__(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        records = model.adapters["dmp"].take_records()
        if not records:
            zero = torch.zeros((), device=next(model.parameters()).device)
            return zero, {}
        importance = torch.stack([r["gates"] for r in records]).sum(0)               # [N, M], Σ over blocks
        imp = cv_squared(importance)
        total, terms = self.cfg.importance_weight * imp, {"dmp/importance_cv2": imp.detach()}
        loads = [r["load"] for r in records if "load" in r]
        if loads:
            per_block = [load.sum(0) for load in loads]                                  # [M] each
            load = (torch.stack([cv_squared(v) for v in per_block]).mean() if self.cfg.load_form == "cv2"
                    else torch.stack([v.sum() for v in per_block]).mean())
            total = total + self.cfg.load_weight * load
            terms["dmp/load"] = load.detach()
        return total, terms


# --------------------------------------------------------------------------------- reporting
def patch_overhead(model: nn.Module) -> dict[str, float]:
    """Parameters the patch adds. ``overhead`` counts prompts and gate, as the paper does (its
    DiT-B/2 +1.96 %, DiT-L/2 +1.43 %); the noise projection is used in training only."""
    patch = model.adapters["dmp"]
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("adapters."))
    prompts = patch.prompts.numel()
    gate = sum(p.numel() for p in patch.gate.parameters()) if patch.gate is not None else 0
    noise = patch.noise.weight.numel() if patch.noise is not None else 0
    return {"backbone": backbone, "prompts": prompts, "gate": gate, "noise": noise,
            "overhead": (prompts + gate) / backbone}


@torch.no_grad()
def gate_usage(model: nn.Module, num_timesteps: int, ranges: int = 10, per_range: int = 8,
               num_classes: int = 0) -> torch.Tensor:
    """Mean gate g [ranges, M] over the patched blocks, per timestep range (low t first), averaged
    over ``per_range`` timesteps in each range and over the classes (noise off): which prompts the
    gate favours at low vs high t."""
    patch = model.adapters["dmp"]
    was = patch.training
    patch.eval()
    device = patch.prompts.device
    rows = []
    try:
        for r in range(ranges):
            lo, hi = r * num_timesteps // ranges, max((r + 1) * num_timesteps // ranges, r * num_timesteps // ranges + 1)
            t = torch.linspace(lo, hi - 1, per_range, device=device).round().long()
            ys = [None] if num_classes <= 0 else [torch.full_like(t, k) for k in range(num_classes)]
            acc = torch.zeros(patch.num_prompts, device=device)
            for y in ys:
                cond = model.embed(t, y)
                source = cond.t_emb if patch.mode == "prepend" else cond.c
                for index in range(patch.depth):
                    acc += patch.gates(source.float(), index).mean(0)
            rows.append(acc / (len(ys) * patch.depth))
    finally:
        patch.train(was)
    return torch.stack(rows).cpu()                                                       # [ranges, M]


class GateUsage:
    """Summary: mean gate per timestep range and prompt (a heatmap in MLflow and ``review``)."""
    name = "dmp_gate_usage"

    def __init__(self, num_timesteps: int, ranges: int = 10):
        self.num_timesteps, self.ranges = num_timesteps, ranges

    def __call__(self, model: nn.Module) -> dict:
        usage = gate_usage(model, self.num_timesteps, self.ranges, num_classes=model.spec.num_classes)
        edges = [r * self.num_timesteps // self.ranges for r in range(self.ranges + 1)]
        return {"kind": "heatmap", "title": "DMP gate usage (mean gate per prompt)", "xlabel": "prompt (token slot)",
                "ylabel": "timestep range", "rows": [f"[{a}, {b})" for a, b in zip(edges, edges[1:])],
                "values": usage.tolist()}


def _build(cfg: DmpConfig, ctx: BuildContext) -> Contribution:
    if cfg.mode == "fine_tuning":
        return Contribution()                          # the baseline: every weight trains, nothing added
    gated = cfg.mode in ("add", "prepend")
    return Contribution(transforms=[DmpTransform(cfg)], aux_losses=[DmpBalance(cfg)] if gated else [],
                        summaries=[GateUsage(ctx.num_timesteps)] if gated else [], freeze_backbone=True)


DESCRIPTOR = register(MethodDescriptor(
    name="dmp", config=DmpConfig, build=_build,
    claims=lambda cfg: () if cfg.mode == "fine_tuning" else ("transform", "aux_loss"),
    examples={"dmp": {"mode": "add"}}, tested_with=(("dmp", "dtr"),),
    refusal="DMP patches a converged model: combine it only with the transforms the base was trained with (DTR)",
    summary="a frozen, converged model patched with timestep-gated prompts (Ham et al., AAAI 2025)"))
