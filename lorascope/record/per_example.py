"""Exact per-example squared gradient norms, computed during the ordinary backward pass.

For a weight used as :math:`y_t = W a_t` at the positions :math:`t` of example :math:`b`, with output gradients
:math:`d_t = \\partial L / \\partial y_t`, the example's gradient is a sum of outer products, and its squared
norm needs neither that gradient nor any other example's (Gray et al. 2024):

.. math:: g_b = \\sum_t d_{bt}\\, a_{bt}^\\top, \\qquad
          |g_b|_F^2 = \\sum_{t, t'} (a_{bt} \\cdot a_{bt'})\\, (d_{bt} \\cdot d_{bt'})

The Gram form costs :math:`\\sim B T^2 (K + L)`, forming :math:`g_b` costs :math:`\\sim B T K L`; the cheaper is
taken per call. Forward hooks keep each hooked module's input (a detached reference to a tensor autograd keeps
anyway) and put a hook on its output; the output hook receives :math:`d` and adds the norms into a small
per-example buffer. A hook on each call's output tensor, rather than a module backward hook, pairs every
gradient with the input of the same call (modules called several times, gradient checkpointing) and adds no
autograd node. Nothing leaves the device and nothing synchronizes with the host, except a one-time check,
at each module's first training call, that its output follows the formula the norms assume.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorascope.errors import InvalidOptionError
from lorascope.model.peft import is_lora_layer

__all__ = ["PerExampleNorms"]

# Temporaries of one norm computation stay below max(this, size of its inputs) elements (tiling, chunking).
_TEMP_ELEMENTS = 1 << 25
_SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.LayerNorm or an RMSNorm"


class PerExampleNorms:
    """Attach to a model; each backward pass adds the per-example squared gradient norms of its examples.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose forward calls define the micro-batches (a training-mode forward with gradients
        enabled starts one).
    targets : mapping of str to sequence of int, optional
        ``{module path: [column]}``: the weight gradient of that module goes to that column of
        :meth:`pop`'s first tensor (exactly one column per module). Modules sharing one weight parameter
        (a tied output head) share its column. For a PEFT LoRA layer the column is
        :math:`|g_A|^2 + |g_B|^2` of its adapter factors (the recorder's gradient of a LoRA matrix). Every
        other supported module, and every bias and norm parameter not listed, goes to the ``other`` total.
        ``None``: every supported module's weight gets a column, one per distinct weight parameter, in
        ``named_modules()`` order (see :attr:`columns`).
    batch_dim : int, default 0
        The example dimension of the hooked modules' inputs, e.g. 1 for sequence-first models.
    strict : bool, default False
        Raise errors from inside the hooks instead of marking the module unsupported (see :attr:`unsupported`).

    Attributes
    ----------
    columns : tuple of str or None
        Per column, the module path whose weight it measures (``""`` is the model itself; None for an index no
        module was given).
    unsupported : dict of str to str
        Module path -> why its per-example norms are not measured. Its column is NaN; an unsupported module
        outside ``targets`` is left out of ``other`` (see :attr:`other_parameters`). Grows while training when a
        module turns out to break an assumption (for example a position embedding whose output is broadcast
        over the batch, so its per-example gradients are summed before its output hook sees them).

    Notes
    -----
    **What is measured.** For each micro-batch (a forward whose outputs receive gradients) with examples
    :math:`b = 1..B` and backpropagated loss :math:`L = \\sum_b L_b`, where :math:`L_b` is example
    :math:`b`'s share of :math:`L` (the terms that depend on its inputs), :meth:`pop` returns
    :math:`|\\partial L_b / \\partial W|_F^2` for each column's weight :math:`W`, and the sum of those squared
    norms over the other measured parameters. The norms are of the share as backpropagated, never rescaled
    here: when the step's gradient is the mean over its :math:`N` examples (``L`` divided by :math:`N`, or by the
    step's token count), :math:`N\\, \\partial L_b / \\partial W` is example :math:`b`'s gradient estimate (their
    mean is the step's gradient), :math:`N^2` times the value returned; the caller converts. A loss scaled for
    mixed precision (``torch.amp.GradScaler``) scales the values by the square of the scale. Examples must not
    interact (no BatchNorm, no in-batch contrastive loss): otherwise :math:`L_b` is not defined by example
    :math:`b` alone.

    **Per layer.** ``nn.Linear`` (weight (out, in)), transformers ``Conv1D`` (weight (in, out),
    :math:`y = x W + b`) and ``nn.Embedding`` (an example's gradient scatters its output gradients into the
    rows of its token ids; repeated ids are summed before the norm, exactly, by sorting the ids) use the
    outer-product form above. ``nn.LayerNorm`` and RMSNorms (class name ending in ``RMSNorm`` or
    ``nn.RMSNorm``; scale ``w`` or ``1 + w``) form the per-example gradient directly,
    :math:`\\sum_t d_{bt} \\odot \\hat x_{bt}`, with :math:`\\hat x` recomputed in float32 from the saved input.
    Biases (:math:`\\sum_t d_{bt}`) always go to ``other``. Any dimensions between the example dimension and
    the feature dimension are positions. Everything is computed in float32, whatever the input precision.

    **Shared weights.** When one weight gets gradients from several calls (a tied output head, a module
    called twice per forward), the example's gradient is the sum of the calls' and its norm includes the cross
    terms, :math:`|g_1 + g_2|^2 = |g_1|^2 + |g_2|^2 + 2 \\langle g_1, g_2 \\rangle`. A call whose gradient arrives
    first keeps what its partners need (for a tied head and the input embedding, its gradient rows at the
    embedding's token ids, (B, T, H), not the logits' gradient) until they arrive. A weight read outside its
    module's forward call (``F.linear(x, module.weight)``, ``nn.MultiheadAttention``'s ``out_proj``) is not
    seen: ``out_proj`` is marked unsupported, the rest is the caller's responsibility.

    **Gradient checkpointing.** Reentrant checkpointing runs the forward without gradients and again
    during the backward pass: only the second run is hooked, so nothing extra is kept. Non-reentrant
    checkpointing (transformers' default) is detected: the first run keeps no input, the recomputation during
    backward supplies it. A module called more than once per forward inside non-reentrant checkpointed code is
    marked unsupported. Without the detection (it relies on private torch hooks), recomputed calls would look
    like extra calls of the same weights: results stay exact or NaN, at a cost in memory and time.

    **Memory and time.** Only references to the current forward's inputs of hooked modules (which autograd
    keeps anyway) until their gradients arrive, released then; per example and column, one float32 until
    :meth:`pop` (call it once per optimizer step). Forward passes without gradients (``torch.no_grad``, or the
    model in eval mode) are not hooked. A training forward whose outputs never get a backward pass leaves
    nothing behind once its outputs are freed. Matrix products run at the precision torch is set to (TF32 on
    recent GPUs when ``torch.backends.cuda.matmul.allow_tf32`` is on).

    **Not supported.** A second backward pass through the same forward (``retain_graph=True``) marks the
    modules it reaches unsupported; several forwards before one backward are separate micro-batches (fine)
    unless checkpointing is on; FSDP flat parameters; ``torch.compile``-d modules (hooks break the graph);
    ``nn.Embedding(scale_grad_by_freq=True)`` (the scale mixes examples).

    References
    ----------
    Gray, Samar, Chen, Rivaud, Fan, Sankaralingam, Miller, Sahoo (2024), "Normalization layer per-example
    gradients are sufficient to predict gradient noise scale in transformers", NeurIPS.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> norms = PerExampleNorms(model)
    >>> norms.attach()
    >>> model(torch.randn(5, 3)).square().sum().backward()
    >>> per_target, other, passes = norms.pop()
    >>> per_target.shape, other.shape, passes, norms.columns
    (torch.Size([5, 2]), torch.Size([5]), 1, ('0', '2'))
    >>> norms.detach()
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, Sequence[int]] | None = None, *,
                 batch_dim: int = 0, strict: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidOptionError("The 'model' parameter of PerExampleNorms must be a torch.nn.Module. "
                                     f"Got {type(model).__name__} instead.")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise InvalidOptionError("The 'batch_dim' parameter of PerExampleNorms must be an int in the range "
                                     f"[0, inf). Got {batch_dim!r} instead.")
        self._model = model
        self._batch_dim = batch_dim
        self._strict = bool(strict)
        self.unsupported: dict[str, str] = {}
        self._sites: list[_Site] = []
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._groups: dict[int, _Group] = {}
        self._build(model, _check_targets(model, targets))
        self._handles: list[Any] = []
        self._attached = False
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks: a forward pre-hook on the model (starts a micro-batch) and, on every supported
        module, a forward hook (keeps the input, hooks the output) and a pre-hook (non-reentrant recomputation).
        Idempotent."""
        if self._attached:
            return
        self._handles.append(self._model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for site in self._sites:
            module = site.module
            self._handles.append(module.register_forward_pre_hook(
                functools.partial(self._on_recompute, site), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                functools.partial(self._on_forward, site), with_kwargs=True))
        self._attached = True

    def detach(self) -> None:
        """Remove every hook. Output hooks already placed on live tensors become no-ops; what was measured
        stays available to :meth:`pop`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attached = False

    def reset(self) -> None:
        """Forget every micro-batch measured since the last :meth:`pop`."""
        self._batches: list[_MicroBatch] = []
        self._current: _MicroBatch | None = None
        self._other_broken = False

    def pop(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The norms of the micro-batches since the last call, then forget them.

        Returns
        -------
        (per_target, other, n_passes) or None
            ``per_target``: float32 (n_examples, n_columns) on the device of the gradients, the micro-batches
            concatenated along the example axis in the order of their forward calls, each entry
            :math:`|\\partial L_b / \\partial W|_F^2` (see the class notes); NaN in a column whose module is
            unsupported or whose value is not exact for that micro-batch. ``other``: float32 (n_examples,), the
            summed squared norms of the other measured parameters (:attr:`other_parameters`), NaN when a
            module left that set after contributing in these micro-batches. ``n_passes``: number of
            micro-batches (forward calls of the model whose outputs got gradients; with one backward per
            forward, the number of backward passes). None when no gradient arrived.
        """
        done = [mb for mb in self._batches if mb.per_target is not None]
        if not done:
            return None
        for mb in done:
            for call in mb.waiting:  # its recomputed input never came: the checkpointing was not understood
                self._mark(call.site, "gradient checkpointing: the recomputation of its input was not seen")
                mb.invalid.update(group for group, _ in call.site.parts)
            mb.waiting.clear()
        device = done[0].per_target.device
        per_target = torch.cat([mb.per_target.to(device) for mb in done])
        other = torch.cat([mb.other.to(device) for mb in done])
        broken = {group for site in self._sites if site.path in self.unsupported for group, _ in site.parts}
        broken.update(*(mb.invalid for mb in done))
        nan_columns = {i for i, path in enumerate(self.columns) if path is None or path in self.unsupported}
        nan_columns.update(group.column for group in broken if group.column >= 0)
        if nan_columns:
            per_target[:, sorted(nan_columns)] = float("nan")
        if self._other_broken or any(group.column < 0 for mb in done for group in mb.invalid):
            other.fill_(float("nan"))
        self._batches = [mb for mb in self._batches if mb.per_target is None]
        self._other_broken = False
        for site in self._sites:
            site.contributed = False
        return per_target, other, len(done)

    @property
    def other_parameters(self) -> tuple[str, ...]:
        """Names (as in ``named_parameters()``, so a tied parameter under its first name) of the parameters
        summed in ``other``, at this moment."""
        names: list[str] = []
        for site in self._sites:
            if site.path in self.unsupported:
                continue
            for group, role in site.parts:
                param = getattr(site.module, role)
                name = self._param_names[id(param)]
                if group.column < 0 and param.requires_grad and name not in names:
                    names.append(name)
        return tuple(names)

    # -- setup -----------------------------------------------------------------------------------------------
    def _build(self, model: nn.Module, targets: dict[str, int] | None) -> None:
        modules = dict(model.named_modules())
        adapters: dict[str, int] = {}  # adapter Linear of a targeted PEFT LoRA layer -> the layer's column
        for path, column in (targets or {}).items():
            found = _lora_adapters(path, modules[path])
            if isinstance(found, str):
                self.unsupported[path] = found
            for sub in found:
                adapters[sub] = column
        mha_children = {id(m.out_proj) for m in modules.values() if isinstance(m, nn.MultiheadAttention)}
        columns: dict[int, int] = {}  # id(weight) -> column
        for path, module in modules.items():
            kind, reason = _kind_of(module)
            if kind and id(module) in mha_children:
                kind, reason = "", "used by nn.MultiheadAttention through its weights, never called"
            if not kind:
                if targets is not None and path in targets and not is_lora_layer(module):
                    self.unsupported[path] = reason
                continue
            site = _Site(path, module, kind)
            weight = module.weight
            if targets is not None:
                column = targets.get(path, adapters.get(path, -1))
                if column >= 0 and columns.setdefault(id(weight), column) != column:
                    raise InvalidOptionError(f"The 'targets' parameter of PerExampleNorms maps modules sharing the "
                                             f"weight of {path!r} to different columns; give them one column.")
            else:
                column = columns.setdefault(id(weight), len(columns))
            for role, param in (("weight", weight), ("bias", getattr(module, "bias", None))):
                if not isinstance(param, nn.Parameter):
                    continue
                group = self._groups.get(id(param))
                if group is None:
                    group = self._groups[id(param)] = _Group(-1)
                if role == "weight" and column >= 0:
                    group.column = column
                site.parts.append((group, role))
            self._sites.append(site)
        n = (max(targets.values()) + 1 if targets else 0) if targets is not None else len(columns)
        names: list[str | None] = [None] * n  # None: no module was given this column ("" is the root module)
        for site in self._sites:
            for group, role in site.parts:
                if role == "weight" and group.column >= 0 and names[group.column] is None:
                    names[group.column] = site.path
        for path, column in (targets or {}).items():
            if path in self.unsupported or is_lora_layer(modules[path]):
                names[column] = path
        self.columns: tuple[str | None, ...] = tuple(names)

    # -- hooks -----------------------------------------------------------------------------------------------
    def _recording(self) -> bool:
        return self._attached and self._model.training and torch.is_grad_enabled() and not _in_functorch()

    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._recording() or torch._C._current_graph_task_id() != -1:
            return
        self._current = _MicroBatch(_examples_of(args, kwargs, self._batch_dim))
        self._batches.append(self._current)

    def _on_forward(self, site: _Site, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        if not self._recording() or site.path in self.unsupported:
            return
        state = _checkpoint_state()
        if state == "recompute" or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # a recomputation is picked up by the pre-hook; an output without gradient gets none
        if not any(_trainable(site, role) for _, role in site.parts):
            return
        try:
            self._start_call(site, args, kwargs, output, deferred=state == "forward")
        except Exception as exc:  # noqa: BLE001 - a measurement problem must not stop training
            self._fail(site, exc)

    def _start_call(self, site: _Site, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor,
                    *, deferred: bool) -> None:
        x = _input_of(args, kwargs)
        problem = self._check_input(site, x)
        if problem:
            self._mark(site, problem)
            return
        assert x is not None
        if self._current is None or (not self._current.from_model and self._current.per_target is not None
                                     and torch._C._current_graph_task_id() == -1):
            # Submodules called without the model: a call after the last micro-batch's backward starts the next.
            self._current = _MicroBatch(x.shape[self._batch_dim], from_model=False)
            self._batches.append(self._current)
        mb = self._current
        if mb.n_examples is None:
            mb.n_examples = x.shape[self._batch_dim]
        if x.shape[self._batch_dim] != mb.n_examples:
            self._mark(site, f"its input has {x.shape[self._batch_dim]} entries along dimension {self._batch_dim}, "
                             f"the model's input {mb.n_examples} examples (flattened tokens, or an output "
                             "broadcast over the batch whose per-example gradients are summed before the hook)")
            return
        if not site.checked and x.numel() and output.numel():
            problem = _check_formula(site, x, output)
            if problem:
                self._mark(site, problem)
                return
            site.checked = True
        call = _Call(site, mb, None if deferred else x.detach(), deferred=deferred)
        if deferred:
            earlier = site.deferred() if site.deferred is not None else None
            if earlier is not None and not earlier.done:
                self._mark(site, "called more than once per forward inside non-reentrant gradient checkpointing")
                return
            site.deferred = weakref.ref(call)
        for group, _ in site.parts:
            state = mb.groups.setdefault(id(group), _GroupState())
            if any(stash is None for _, stash in state.done):
                # A partner arriving after an earlier call of this weight finished without keeping its factors
                # (reentrant checkpointing of a reused module): this micro-batch's cross term is lost. Keep the
                # factors from now on.
                mb.invalid.add(group)
                group.keep_stash = True
            state.calls.append(weakref.ref(call))
        output.register_hook(functools.partial(self._on_grad, call))

    def _on_recompute(self, site: _Site, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Non-reentrant checkpointing re-runs the forward during backward, possibly stopping inside this module's
        # forward once the last saved tensor is rebuilt: take the input here, before the module runs.
        if torch._C._current_graph_task_id() == -1 or site.deferred is None or not self._attached:
            return
        if _checkpoint_state() != "recompute":
            return
        call = site.deferred()
        x = _input_of(args, kwargs)
        if call is None or call.done or call.input is not None or x is None:
            return
        call.input = x.detach()
        if call.grad is not None:
            self._finish(call)

    def _on_grad(self, call: _Call, grad: torch.Tensor) -> None:
        if not self._attached:
            call.input = None
            return
        if call.done or call.grad is not None:
            self._mark(call.site, "a second backward pass through one forward (retain_graph=True)")
            return
        call.grad = grad.detach()
        if call.input is not None:
            self._finish(call)
        else:  # a checkpointed call, finished when its recomputed input arrives
            call.mb.waiting.append(call)

    def _finish(self, call: _Call) -> None:
        site = call.site
        try:
            if site.path not in self.unsupported:
                with torch.no_grad():
                    self._accumulate(call)
        except Exception as exc:  # noqa: BLE001 - a measurement problem must not stop training
            self._fail(site, exc)
        finally:
            call.done = True
            call.input = call.grad = None
            if call.deferred and call in call.mb.waiting:
                call.mb.waiting.remove(call)

    def _accumulate(self, call: _Call) -> None:
        site, mb = call.site, call.mb
        assert call.input is not None and call.grad is not None
        site.contributed = True  # before any addition: a failure below must invalidate what was added
        contributions = _contributions(site, call.input, call.grad, self._batch_dim)
        if mb.per_target is None:
            mb.allocate(len(self.columns), call.input.shape[self._batch_dim], call.grad.device)
        for group, role in site.parts:
            if role not in contributions or not _trainable(site, role):
                continue
            mine = contributions[role]
            value = _self_norm(mine)
            state = mb.groups[id(group)]
            for _, stash in state.done:
                if stash is None:
                    continue
                value = value + 2.0 * _cross(stash, mine, id(call))
            pending = [c for c in (ref() for ref in state.calls) if c is not None and not c.done and c is not call]
            stash = _make_stash(mine, pending, group.keep_stash, self._batch_dim) if (
                pending or group.keep_stash) else None
            state.done.append((id(call), stash))
            if not pending and not group.keep_stash:
                state.done = [(key, None) for key, _ in state.done]  # every call of this weight is in: free
            mb.add(group.column, value)

    # -- problems --------------------------------------------------------------------------------------------
    def _check_input(self, site: _Site, x: Any) -> str:
        if not isinstance(x, torch.Tensor):
            return f"called with a {type(x).__name__} input, not a tensor"
        feature_dims = {"embedding": 0, "linear": 1, "conv1d": 1}.get(site.kind, site.module.weight.ndim)
        if x.ndim - feature_dims <= self._batch_dim:
            return f"its input of shape {tuple(x.shape)} has no example dimension {self._batch_dim}"
        return ""

    def _mark(self, site: _Site, reason: str) -> None:
        if site.path in self.unsupported:
            return
        self.unsupported[site.path] = reason
        if site.contributed and any(group.column < 0 for group, _ in site.parts):
            self._other_broken = True

    def _fail(self, site: _Site, exc: Exception) -> None:
        if self._strict:
            raise exc
        self._mark(site, f"{type(exc).__name__} while measuring: {exc}")


# ----------------------------------------------------------------------------------------------------------
# State


@dataclass(eq=False)
class _Group:
    """One parameter, possibly shared by several modules (tying)."""

    column: int  # -1: the "other" total
    keep_stash: bool = False


@dataclass(eq=False)
class _Site:
    """One supported module."""

    path: str
    module: nn.Module
    kind: str  # linear, conv1d, embedding, layer_norm, rms_norm
    parts: list[tuple[_Group, str]] = field(default_factory=list)  # (group, "weight" | "bias")
    checked: bool = False
    contributed: bool = False
    deferred: weakref.ref[_Call] | None = None


@dataclass(eq=False)
class _Call:
    """One forward call of a module, waiting for its output gradient."""

    site: _Site
    mb: _MicroBatch
    input: torch.Tensor | None
    grad: torch.Tensor | None = None
    done: bool = False
    deferred: bool = False


@dataclass(eq=False)
class _GroupState:
    """The calls of one parameter in one micro-batch."""

    calls: list[weakref.ref[_Call]] = field(default_factory=list)
    done: list[tuple[int, _Stash | None]] = field(default_factory=list)


class _MicroBatch:
    """Per-example buffers of one forward/backward pass."""

    def __init__(self, n_examples: int | None, *, from_model: bool = True) -> None:
        self.n_examples = n_examples
        self.from_model = from_model
        self.per_target: torch.Tensor | None = None
        self.other: torch.Tensor | None = None
        self.groups: dict[int, _GroupState] = {}
        self.invalid: set[_Group] = set()  # parameters whose value is not exact for this micro-batch
        self.waiting: list[_Call] = []  # checkpointed calls whose gradient came before their recomputed input

    def allocate(self, n_columns: int, n_examples: int, device: torch.device) -> None:
        self.per_target = torch.zeros(n_examples, n_columns, device=device)
        self.other = torch.zeros(n_examples, device=device)

    def add(self, column: int, value: torch.Tensor) -> None:
        assert self.per_target is not None and self.other is not None
        value = value.to(self.per_target.device)
        if column >= 0:
            self.per_target[:, column] += value
        else:
            self.other += value


@dataclass(eq=False)
class _Contribution:
    """One call's per-example gradient of one parameter: ``sum_t rows_t cols_t^T`` in the parameter's stored
    layout (rows dense (B, T, P), or token ids (B, T) standing for one-hot rows), or ``direct`` (B, P)."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    direct: torch.Tensor | None = None

    @property
    def index(self) -> bool:
        return self.rows is not None and not self.rows.is_floating_point()


@dataclass(eq=False)
class _Stash:
    """What a finished call keeps for the calls of the same parameter still to come."""

    full: _Contribution | None
    toward: dict[int, torch.Tensor] = field(default_factory=dict)  # id(call) -> its gradient rows at its ids


def _trainable(site: _Site, role: str) -> bool:
    param = getattr(site.module, role, None)
    return isinstance(param, torch.Tensor) and param.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Module kinds and checks


def _kind_of(module: nn.Module) -> tuple[str, str]:
    """The kind of a supported module, or ("", why not)."""
    cls = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        if hasattr(module, "parametrizations"):
            return "", f"{cls} with a parametrized weight"
        return "", f"{cls} is not a supported module ({_SUPPORTED})"
    if isinstance(module, nn.Linear):
        return "linear", ""
    if cls == "Conv1D" and hasattr(module, "nf") and weight.ndim == 2:
        return "conv1d", ""
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq:
            return "", "nn.Embedding with scale_grad_by_freq=True (the scale mixes the batch's examples)"
        return "embedding", ""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm", ""
    if isinstance(module, getattr(nn, "RMSNorm", ())) or cls.endswith("RMSNorm"):
        return "rms_norm", ""
    if is_lora_layer(module):
        return "", "PEFT LoRA layer (not targeted: its lora_A / lora_B Linear modules go to 'other')"
    return "", f"{cls} is not a supported module ({_SUPPORTED})"


def _lora_adapters(path: str, module: nn.Module) -> list[str] | str:
    """Paths of the adapter Linear modules of a PEFT LoRA layer (none for another module), or why not."""
    if not is_lora_layer(module):
        return []
    if len(getattr(module, "lora_embedding_A", None) or {}):
        return "PEFT LoRA embedding layer (its adapters are parameters read through F.embedding, not modules)"
    found = [f"{path}.{part}.{name}" for part in ("lora_A", "lora_B")
             for name, sub in getattr(module, part).items() if isinstance(sub, nn.Linear)]
    if len(found) != 2 * len(module.lora_A):
        return "PEFT LoRA layer whose adapters are not nn.Linear"
    return found


def _check_targets(model: nn.Module, targets: Mapping[str, Sequence[int]] | None) -> dict[str, int] | None:
    if targets is None:
        return None
    if not isinstance(targets, Mapping):
        raise InvalidOptionError("The 'targets' parameter of PerExampleNorms must be None or a mapping "
                                 f"{{module path: [column]}}. Got {type(targets).__name__} instead.")
    paths = dict(model.named_modules())
    out: dict[str, int] = {}
    for path, columns in targets.items():
        if path not in paths:
            raise InvalidOptionError(f"The 'targets' parameter of PerExampleNorms names module {path!r}, which "
                                     f"{type(model).__name__} does not have. Use paths from model.named_modules().")
        cols = list(columns) if isinstance(columns, Sequence) and not isinstance(columns, str) else [columns]
        if len(cols) != 1 or isinstance(cols[0], bool) or not isinstance(cols[0], int) or cols[0] < 0:
            raise InvalidOptionError(f"The 'targets' parameter of PerExampleNorms must map each module to one "
                                     f"column index >= 0. Got {columns!r} for {path!r} instead.")
        out[path] = int(cols[0])
    return out


def _examples_of(args: tuple[Any, ...], kwargs: dict[str, Any], batch_dim: int) -> int | None:
    """Examples of one model call: the size along ``batch_dim`` of ``input_ids`` or the first tensor input."""
    x = kwargs.get("input_ids")
    if not isinstance(x, torch.Tensor):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None:
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return int(x.shape[batch_dim]) if isinstance(x, torch.Tensor) and x.ndim > batch_dim else None


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0] if len(args) == 1 and not kwargs else _only_tensor(args, kwargs)
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def _only_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input when a module gets extra arguments: only a single tensor argument is understood."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
        v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else args[0]


def _in_functorch() -> bool:
    """Inside a torch.func transform (vmap, grad): its calls are not training micro-batches."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def _checkpoint_state() -> str:
    """"forward" inside a non-reentrant checkpointed forward, "recompute" in its recomputation, else ""."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError, TypeError):
        return ""
    if not hooks:
        return ""
    pack = hooks[0]
    name = getattr(getattr(pack, "__wrapped__", pack), "__qualname__", "")
    if name.startswith("_checkpoint_hook."):
        return "forward"
    if name.startswith("_recomputation_hook."):
        return "recompute"
    return ""


def _check_formula(site: _Site, x: torch.Tensor, output: torch.Tensor) -> str:
    """Check once that the module computes what the norms assume; "" when it does."""
    module = site.module
    with torch.no_grad():
        if site.kind == "linear":
            expected = [nn.functional.linear(x, module.weight, module.bias)]
        elif site.kind == "conv1d":
            y = x.reshape(-1, x.shape[-1]) @ module.weight
            expected = [(y if module.bias is None else y + module.bias).reshape(output.shape)]
        elif site.kind == "embedding":
            expected = [nn.functional.embedding(x, module.weight)]
        else:
            x_hat = _normalized(site, x)
            w = module.weight.float()
            shift = module.bias.float() if getattr(module, "bias", None) is not None else 0.0
            expected = [w * x_hat + shift]
            if site.kind == "rms_norm":
                expected.append((1.0 + w) * x_hat)  # Gemma-style scale, same weight gradient
        out = output.detach().float()
        tol = 1e-2 if output.dtype in (torch.float32, torch.float64) else 5e-2
        for ref in expected:
            if ref.shape == out.shape:
                ref = ref.float()
                if bool(((out - ref).abs().max() <= tol * (ref.abs().max() + 1e-12)).item()):
                    return ""
    formula = {"linear": "x W^T + b", "conv1d": "x W + b", "embedding": "W[ids]",
               "layer_norm": "w * (x - mean) / std + b", "rms_norm": "w * x / rms(x) (or (1 + w) * x / rms(x))"}
    return f"its output is not {formula[site.kind]} of its input"


def _normalized(site: _Site, x: torch.Tensor) -> torch.Tensor:
    """x_hat in float32, over the module's normalized (trailing) dimensions, flattened to one."""
    module = site.module
    k = module.weight.ndim
    xf = x.float().reshape(*x.shape[: x.ndim - k], -1)
    if site.kind == "layer_norm":
        var, mean = torch.var_mean(xf, dim=-1, keepdim=True, unbiased=False)
        return ((xf - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # nn.RMSNorm's default
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------
# The arithmetic


def _positions(t: torch.Tensor, batch_dim: int, feature_dims: int) -> torch.Tensor:
    """(B, T, F) (or (B, T) for ``feature_dims=0``): examples first, positions flattened, features flattened."""
    if batch_dim:
        t = t.movedim(batch_dim, 0)
    b = t.shape[0]
    if feature_dims == 0:
        return t.reshape(b, -1)
    features = t.shape[t.ndim - feature_dims:].numel()
    return t.reshape(b, -1, features)


def _contributions(site: _Site, x: torch.Tensor, d: torch.Tensor, batch_dim: int) -> dict[str, _Contribution]:
    """Per-example gradient factors of the module's weight and bias from its input and output gradient."""
    module = site.module
    if site.kind == "embedding":
        ids = _positions(x, batch_dim, 0)
        cols = _positions(d, batch_dim, 1).float()
        if module.padding_idx is not None:  # the padding row gets no gradient
            cols = cols * (ids != module.padding_idx).unsqueeze(-1)
        return {"weight": _Contribution(rows=ids, cols=cols)}
    dd = _positions(d, batch_dim, 1).float()
    out = {"bias": _Contribution(direct=dd.sum(1))}
    if site.kind in ("linear", "conv1d"):
        a = _positions(x, batch_dim, 1).float()
        out["weight"] = _Contribution(rows=dd, cols=a) if site.kind == "linear" else _Contribution(rows=a, cols=dd)
        return out
    k = module.weight.ndim
    x_hat = _positions(_normalized(site, x), batch_dim, k)
    out["weight"] = _Contribution(direct=(_positions(d, batch_dim, k).float() * x_hat).sum(1))
    out["bias"] = _Contribution(direct=_positions(d, batch_dim, k).float().sum(1))
    return out


def _self_norm(c: _Contribution) -> torch.Tensor:
    """(B,) squared Frobenius norms of the per-example gradients of one contribution."""
    if c.direct is not None:
        return c.direct.square().sum(1)
    rows, cols = c.rows, c.cols
    assert rows is not None and cols is not None
    if c.index:
        return _segment_sums(rows, [cols])[0].square().sum((1, 2))
    if rows.shape[1] == 1:
        return rows.square().sum((1, 2)) * cols.square().sum((1, 2))
    return _inner(rows, cols, rows, cols)


def _inner(r1: torch.Tensor, k1: torch.Tensor, r2: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """(B,) inner products :math:`\\langle \\sum_s r_{1s} k_{1s}^T, \\sum_t r_{2t} k_{2t}^T \\rangle` per example,
    by Gram matrices (tiled over positions) or by forming both sums, whichever costs fewer operations, unless
    only the other keeps its temporaries within budget."""
    b, s, p = r1.shape
    t, q = r2.shape[1], k1.shape[2]
    budget = max(_TEMP_ELEMENTS, r1.numel() + k1.numel() + r2.numel() + k2.numel())
    same = r1 is r2 and k1 is k2
    direct_per_example = p * q * (1 if same else 2)
    gram = s * t * (p + q + 1) < p * q * (s + t + 1)
    if (direct_per_example <= budget) != (2 * s * t <= budget):
        gram = direct_per_example > budget
    if gram:  # sum_{s,t} (r1_s . r2_t)(k1_s . k2_t), over position tiles of at most budget / (2B) pairs
        tile = max(1, math.isqrt(max(1, budget // (2 * b))))
        total = r1.new_zeros(b)
        for i in range(0, s, tile):
            for j in range(0, t, tile):
                rr = r1[:, i:i + tile] @ r2[:, j:j + tile].transpose(1, 2)
                total += (rr * (k1[:, i:i + tile] @ k2[:, j:j + tile].transpose(1, 2))).sum((1, 2))
        return total
    step = max(1, budget // direct_per_example)  # examples at a time
    parts = []
    for i in range(0, b, step):
        g1 = r1[i:i + step].transpose(1, 2) @ k1[i:i + step]
        parts.append(g1.square().sum((1, 2)) if same else
                     (g1 * (r2[i:i + step].transpose(1, 2) @ k2[i:i + step])).sum((1, 2)))
    return torch.cat(parts)


def _cross(stash: _Stash, c: _Contribution, call_key: int) -> torch.Tensor:
    """(B,) inner products between a finished call's per-example gradients and ``c``'s."""
    if call_key in stash.toward:  # the partner's gradient rows at this call's ids, (B, T, Q)
        assert c.cols is not None
        return (stash.toward[call_key] * c.cols).sum((1, 2))
    p = stash.full
    if p is None:
        raise RuntimeError("a shared weight's partner call kept no factors")
    if p.direct is not None or c.direct is not None:
        if p.direct is None or c.direct is None:
            raise RuntimeError("a parameter shared between a matrix module and a norm module")
        return (p.direct * c.direct).sum(1)
    assert p.rows is not None and p.cols is not None and c.rows is not None and c.cols is not None
    if p.index and c.index:  # sum over shared token ids of the two calls' summed rows
        sp, sc = _segment_sums(torch.cat([p.rows, c.rows], 1), [p.cols, c.cols])
        return (sp * sc).sum((1, 2))
    if p.index:
        return (_rows_at(c, p.rows) * p.cols).sum((1, 2))
    if c.index:
        return (_rows_at(p, c.rows) * c.cols).sum((1, 2))
    return _inner(p.rows, p.cols, c.rows, c.cols)


def _rows_at(dense: _Contribution, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids[b, t]`` of each example's gradient ``sum_s rows_s cols_s^T``: (B, T, Q), without forming it."""
    assert dense.rows is not None and dense.cols is not None
    b, s, _ = dense.rows.shape
    picked = dense.rows.gather(2, ids.unsqueeze(1).expand(b, s, ids.shape[1]))  # (B, S, T)
    return picked.transpose(1, 2) @ dense.cols


def _segment_sums(ids: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum the vectors of equal ids within each example, for each of ``parts`` (consecutive position ranges
    of ``ids``): list of (B, T_all, Q), one row per distinct id (unused rows zero)."""
    b, t = ids.shape
    sorted_ids, order = ids.sort(dim=1)
    start = torch.ones_like(sorted_ids, dtype=torch.bool)
    start[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = torch.empty_like(order).scatter_(1, order, start.long().cumsum(1) - 1)
    out, offset = [], 0
    for cols in parts:
        n = cols.shape[1]
        index = segment[:, offset:offset + n].unsqueeze(-1).expand(b, n, cols.shape[2])
        out.append(cols.new_zeros(b, t, cols.shape[2]).scatter_add_(1, index, cols))
        offset += n
    return out


def _make_stash(c: _Contribution, pending: list[_Call], keep_all: bool, batch_dim: int) -> _Stash:
    """What the still pending calls of the same weight will need from ``c``."""
    if c.rows is None or c.index:
        return _Stash(full=c)  # small: ids or direct gradients, and the output gradients of an embedding
    toward: dict[int, torch.Tensor] = {}
    need_full = keep_all
    for other in pending:
        if other.site.kind == "embedding" and other.input is not None:
            toward[id(other)] = _rows_at(c, _positions(other.input, batch_dim, 0))
        else:
            need_full = True
    return _Stash(full=c if need_full else None, toward=toward)
