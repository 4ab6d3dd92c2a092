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

PCGrad and Nash-MTL need the interval gradients only through their Gram matrix ``G = g gᵀ`` [K, K]
and a weighted sum ``Σ_k w_k g_k`` (``mtl/pcgrad.py``, ``mtl/nash.py``). :meth:`task_gradients`
therefore never builds the [K, P] matrix: per layer it forms the K interval gradients with ONE
batched GEMM over the samples grouped by interval (:class:`IntervalGroups`: a view of the batch
under ANT's stratified sampling, else gathered and zero-padded to the largest group), averages
them across ranks and adds their Gram block to ``G``. With ``methods.ant.interval_grads: keep``
(the default) each layer's K gradients are held and ``write(w)`` is their weighted sum; with
``recompute`` they are dropped and ``write(w)`` forms the weighted sum as one weighted
weight-gradient pass (each sample's output gradient scaled by ``w`` of its interval), averaged
across ranks like DDP's gradients.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GroupedGradientCapture", "TaskGradients", "DenseTaskGradients", "LayerwiseTaskGradients",
           "IntervalGroups", "write_gradient"]


def _supported(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.groups == 1
            and module.padding in ((0, 0), 0) and module.dilation == (1, 1))


def write_gradient(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
    """``param.grad`` of each parameter from its slice of the flat [P] vector (in ``params`` order)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


class TaskGradients(Protocol):
    """The interval gradients as PCGrad and Nash use them."""
    gram: torch.Tensor                                  # [K, K] float64, rows of inactive intervals zero

    def write(self, weights: torch.Tensor) -> None: ...   # param.grad = Σ_k weights_k g_k


class DenseTaskGradients:
    """From a materialised [K, P] matrix (the fallback path, and tests)."""

    def __init__(self, grads: torch.Tensor, params: list[nn.Parameter]):
        self.grads, self.params = grads, params
        self.gram = (grads.double() @ grads.double().T)

    def write(self, weights: torch.Tensor) -> None:
        write_gradient(weights.to(self.grads.device, self.grads.dtype) @ self.grads, self.params)


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

    def task_gradients(self, total: torch.Tensor, task: torch.Tensor, active: torch.Tensor,
                       runtime: Any, keep: bool = False) -> "LayerwiseTaskGradients":
        """Gram matrix of the interval gradients (averaged across ranks), layer by layer; ``keep``:
        hold each layer's K gradients for the update (see :class:`LayerwiseTaskGradients`)."""
        groups = IntervalGroups(task, len(active))   # its host read waits for the forward pass only: the
        mods = list(self.outputs)                    # backward and the per-layer loop are then queued at once
        deltas = torch.autograd.grad(total, [self.outputs[m] for m in mods], allow_unused=True)
        self.grads = {m: d for m, d in zip(mods, deltas) if d is not None}
        return LayerwiseTaskGradients(self, task, active, runtime, keep=keep, groups=groups)

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


def padded_index(task: torch.Tensor, counts: torch.Tensor, m: int) -> torch.Tensor:
    """[K, m] sample indices grouped by interval, padded with N (the zero row appended by the gather)."""
    n = len(task)
    order = torch.argsort(task, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=task.device) - starts[task[order]]
    index = torch.full((len(counts), m), n, dtype=torch.long, device=task.device)
    index[task[order], slot] = order
    return index


class IntervalGroups:
    """How each interval's samples are gathered into ``[K, m, ...]`` for the per-layer batched GEMM.

    ANT's stratified sampler lays the batch out interval by interval in equal groups, so the
    grouping is a free view. Equal groups in another order take one gather; unequal groups (i.i.d.
    sampling, a curriculum's narrowed set) are zero-padded to the largest group. Deciding needs the
    group sizes on the host: one read per step, which PCGrad and Nash wait for anyway."""

    def __init__(self, task: torch.Tensor, k: int):
        n = len(task)
        counts = torch.bincount(task, minlength=k)
        ordered = (task[1:] >= task[:-1]).all() if n > 1 else torch.ones((), dtype=torch.bool, device=task.device)
        host = torch.cat([counts, ordered.long().view(1)]).tolist()               # the one host read
        sizes, self.k = host[:k], k
        self.m = max(max(sizes), 1)
        uniform = all(c == self.m for c in sizes)
        self.mode = ("view" if host[k] else "gather") if uniform else "padded"
        self.index = None
        if self.mode == "gather":
            self.index = torch.argsort(task, stable=True).view(k, self.m)
        elif self.mode == "padded":
            self.index = padded_index(task, counts, self.m)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [K, m, ...]; padding rows are zero."""
        if self.mode == "view":
            return x.reshape(self.k, self.m, *x.shape[1:])
        if self.mode == "gather":
            return x[self.index]
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[self.index]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, L, C] (L = 1 for a plain [N, C])."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LayerwiseTaskGradients:
    """``gram`` accumulated layer by layer from a :class:`GroupedGradientCapture`; ``write(w)``
    forms ``Σ_k w_k g_k``.

    ``keep=False`` holds no more than one layer's K gradients at a time and recomputes the update
    as one weighted weight-gradient pass from the kept layer inputs and output gradients (a step
    costs about 4/3 of vanilla's FLOPs: the grouped pass and the update pass each equal one
    weight-gradient pass). ``keep=True`` holds every layer's K gradients ([K, P] floats in all,
    e.g. 4.2 GB for DiT-B/2 at K = 8) and forms the update as their weighted sum, with no second
    pass."""

    def __init__(self, capture: GroupedGradientCapture, task: torch.Tensor, active: torch.Tensor, runtime: Any,
                 keep: bool = False, groups: Optional[IntervalGroups] = None):
        self.task, self.runtime = task, runtime
        self.modules, self.params = capture.modules, capture.params
        self.inputs, self.grads = dict(capture.inputs), dict(capture.grads)     # kept past the capture's exit
        k = len(active)
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=task.device)
        self.kept: dict[nn.Module, tuple[list[str], torch.Tensor]] = {}          # module -> (names, [K, P_layer])
        groups = groups or IntervalGroups(task, k)
        mask = active.to(task.device)[:, None].float()
        owned = {id(p) for p in self.params}
        for module in self.modules:
            blocks = {name: b for name, b in self._grouped(module, groups).items() if id(getattr(module, name)) in owned}
            if not blocks:
                continue
            flat = torch.cat([b.reshape(k, -1) for b in blocks.values()], dim=1).mul_(mask)  # [K, P_layer]
            if runtime.world_size > 1:
                flat = runtime.all_reduce(flat, op="mean")
            self.gram += (flat @ flat.T).double()
            if keep:                      # the update needs only `kept`: free the layer's I/O as we go
                self.kept[module] = (list(blocks), flat)
                for held in (self.inputs, self.grads, capture.inputs, capture.grads, capture.outputs):
                    held.pop(module, None)

    def _grouped(self, module: nn.Module, groups: IntervalGroups) -> dict[str, torch.Tensor]:
        """Per-interval gradients of ``module``'s parameters, [K, *shape] each, one batched GEMM."""
        g = self.grads.get(module)
        if g is None:
            return {}
        a, k = self.inputs[module], groups.k
        if isinstance(module, nn.Embedding):
            vocab = module.weight.shape[0]
            flat = (self.task.view(-1, *([1] * (a.dim() - 1))) * vocab + a).reshape(-1)
            w = torch.zeros(k * vocab, g.shape[-1], device=g.device).index_add_(0, flat, g.reshape(-1, g.shape[-1]).float())
            return {"weight": w.view(k, vocab, -1)}
        if isinstance(module, nn.Conv2d):
            a = F.unfold(a, module.kernel_size, stride=module.stride).transpose(1, 2)    # [N, L, C·p·p]
            g = g.flatten(2).transpose(1, 2)                                            # [N, L, D]
        a, g = _rows(a).to(g.dtype), _rows(g)
        pad_a, pad_g = groups.gather(a), groups.gather(g)                              # [K, m, L, C|D]
        pad_a, pad_g = pad_a.reshape(k, -1, a.shape[-1]), pad_g.reshape(k, -1, g.shape[-1])
        out = {"weight": torch.bmm(pad_g.transpose(1, 2), pad_a).float().reshape(k, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = pad_g.sum(1).float()
        return out

    def write(self, weights: torch.Tensor) -> None:
        """``param.grad = Σ_k weights_k g_k``: from the kept per-layer gradients (already averaged
        across ranks), else each sample's output gradient scaled by its interval's weight, one
        weight-gradient pass, then averaged across ranks."""
        if self.kept:
            self._write_kept(weights)
            return
        scale = weights.to(self.task.device, torch.float32)[self.task]                  # [N]
        grads: dict[int, torch.Tensor] = {}
        for module in self.modules:
            g = self.grads.get(module)
            if g is None:
                continue
            g = g * scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
            for name, value in self._weighted(module, g).items():
                grads[id(getattr(module, name))] = value
        params = self.params
        flat = torch.cat([grads.get(id(p), torch.zeros_like(p, dtype=torch.float32)).reshape(-1) for p in params])
        if self.runtime.world_size > 1:
            flat = self.runtime.all_reduce(flat, op="mean")
        write_gradient(flat, params)

    def _write_kept(self, weights: torch.Tensor) -> None:
        """Each ``param.grad`` a view of its layer's weighted sum: no concatenation and no copy per
        parameter (this runs after the Gram matrix was read, while the device waits for the host)."""
        written: set[int] = set()
        w = weights.to(self.task.device, torch.float32)                                 # one copy, not one per layer
        for module, (names, flat) in self.kept.items():
            combined = w @ flat                                                         # [P_layer]
            offset = 0
            for name in names:
                p = getattr(module, name)
                p.grad = combined[offset:offset + p.numel()].view_as(p).to(p.dtype)
                written.add(id(p))
                offset += p.numel()
        for p in self.params:
            if id(p) not in written:                                                    # no gradient reached it
                p.grad = torch.zeros_like(p)

    def _weighted(self, module: nn.Module, g: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.inputs[module]
        if isinstance(module, nn.Embedding):
            w = torch.zeros_like(module.weight, dtype=torch.float32)
            return {"weight": w.index_add_(0, a.reshape(-1), g.reshape(-1, g.shape[-1]).float())}
        if isinstance(module, nn.Conv2d):
            a = F.unfold(a, module.kernel_size, stride=module.stride).transpose(1, 2)
            g = g.flatten(2).transpose(1, 2)
        a2, g2 = a.reshape(-1, a.shape[-1]).to(g.dtype), g.reshape(-1, g.shape[-1])
        out = {"weight": (g2.T @ a2).float().reshape(module.weight.shape)}
        if module.bias is not None:
            out["bias"] = g2.sum(0).float()
        return out
