"""Per-interval gradients from ONE backward pass, for PCGrad and Nash-MTL (ANT; docs/methods.md).

A DiT has no interaction between samples, so the gradient of interval k's loss is the weight
gradient restricted to the samples whose timestep lies in interval k. For every Linear, patch
Conv2d (kernel = stride) and Embedding we keep the layer input and capture the output gradient
during one backward of Σ_k L_k, then form ``g_k = Σ_{n∈k} δ_nᵀ a_n`` per layer: the same FLOPs as
one weight-gradient pass, split by interval, instead of K full backward passes. The backward is
asked only for the gradients of the layer OUTPUTS, so autograd skips its own weight-gradient
GEMMs: the whole step costs about one ordinary backward. Networks with other parameterised
layers, or a layer used twice in a forward pass, fall back to a batched backward
(``is_grads_batched``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GroupedGradientCapture"]


def _supported(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.groups == 1
            and module.padding in ((0, 0), 0) and module.dilation == (1, 1))


class GroupedGradientCapture:
    """Context manager: records layer inputs and output gradients of ``model`` while active."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.modules = [m for m in model.modules() if _supported(m) and any(p.requires_grad for p in m.parameters(recurse=False))]
        covered = {id(p) for m in self.modules for p in m.parameters(recurse=False)}
        self.params = params
        self.complete = all(id(p) in covered for p in params)
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}
        self.grads: dict[nn.Module, torch.Tensor] = {}
        self.calls: dict[nn.Module, int] = {}
        self._handles: list = []

    def __enter__(self) -> "GroupedGradientCapture":
        if self.complete:
            self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.inputs, self.outputs, self.grads, self.calls = [], {}, {}, {}, {}

    def _hook(self, module: nn.Module, inputs, output) -> None:
        self.calls[module] = self.calls.get(module, 0) + 1
        self.inputs[module] = inputs[0].detach()
        if output.requires_grad:
            self.outputs[module] = output

    def usable(self) -> bool:
        return self.complete and bool(self.inputs) and all(c == 1 for c in self.calls.values())

    def gradients(self, total: torch.Tensor, task: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """[K, P] interval gradients from one backward of ``total`` (= Σ_k task_loss_k)."""
        k = len(active)
        mods = list(self.outputs)
        deltas = torch.autograd.grad(total, [self.outputs[m] for m in mods], allow_unused=True)  # no weight GEMMs
        self.grads = {m: d for m, d in zip(mods, deltas) if d is not None}
        out = torch.zeros(k, sum(p.numel() for p in self.params), device=total.device)   # [K, P]
        offsets, pos = {}, 0
        for p in self.params:
            offsets[id(p)] = pos
            pos += p.numel()
        for group in (int(i) for i in torch.nonzero(active).flatten()):
            rows = torch.nonzero(task == group).flatten()
            for module in self.modules:
                for name, grad in self._module_grads(module, rows).items():
                    p = getattr(module, name)
                    if id(p) in offsets:
                        out[group, offsets[id(p)]:offsets[id(p)] + p.numel()] = grad.reshape(-1)
        return out

    def _module_grads(self, module: nn.Module, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.grads.get(module)
        if g is None:
            return {}
        a = self.inputs[module].index_select(0, rows)
        g = g.index_select(0, rows)
        if isinstance(module, nn.Embedding):
            w = torch.zeros_like(module.weight).index_add_(0, a.reshape(-1), g.reshape(-1, g.shape[-1]).float())
            return {"weight": w}
        if isinstance(module, nn.Conv2d):
            patches = F.unfold(a, module.kernel_size, stride=module.stride)         # [n, C·p·p, L]
            g2 = g.flatten(2)                                                      # [n, D, L]
            w = torch.einsum("ndl,ncl->dc", g2, patches.to(g2.dtype)).float().reshape(module.weight.shape)
            out = {"weight": w}
            if module.bias is not None:
                out["bias"] = g2.sum(dim=(0, 2)).float()
            return out
        a2 = a.reshape(-1, a.shape[-1]).to(g.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        out = {"weight": (g2.T @ a2).float()}
        if module.bias is not None:
            out["bias"] = g2.sum(0).float()
        return out
