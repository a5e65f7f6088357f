"""The hook class of the per-example norms (see :mod:`lorascope.record.per_example` for the method)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from lorascope.errors import InvalidOptionError
from lorascope.model.peft import is_lora_layer
from lorascope.record.per_example.kernels import contributions, cross, make_stash, self_norm
from lorascope.record.per_example.layers import (
    check_formula,
    check_targets,
    examples_of,
    input_of,
    kind_of,
    lora_adapters,
)
from lorascope.record.per_example.state import Call, Group, GroupState, MicroBatch, Site


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
        self._sites: list[Site] = []
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._groups: dict[int, Group] = {}
        self._build(model, check_targets(model, targets))
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
        self._batches: list[MicroBatch] = []
        self._current: MicroBatch | None = None
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
        targets = [cast(torch.Tensor, mb.per_target) for mb in done]  # not None: chosen so above, and then
        others = [cast(torch.Tensor, mb.other) for mb in done]  # ``other`` is set with ``per_target`` (state.py)
        for mb in done:
            for call in mb.waiting:  # its recomputed input never came: the checkpointing was not understood
                self._mark(call.site, "gradient checkpointing: the recomputation of its input was not seen")
                mb.invalid.update(group for group, _ in call.site.parts)
            mb.waiting.clear()
        device = targets[0].device
        per_target = torch.cat([t.to(device) for t in targets])
        other = torch.cat([t.to(device) for t in others])
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
            found = lora_adapters(path, modules[path])
            if isinstance(found, str):
                self.unsupported[path] = found
            for sub in found:
                adapters[sub] = column
        mha_children = {id(m.out_proj) for m in modules.values() if isinstance(m, nn.MultiheadAttention)}
        columns: dict[int, int] = {}  # id(weight) -> column
        for path, module in modules.items():
            kind, reason = kind_of(module)
            if kind and id(module) in mha_children:
                kind, reason = "", "used by nn.MultiheadAttention through its weights, never called"
            if not kind:
                if targets is not None and path in targets and not is_lora_layer(module):
                    self.unsupported[path] = reason
                continue
            site = Site(path, module, kind)
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
                    group = self._groups[id(param)] = Group(-1)
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
        self._current = MicroBatch(examples_of(args, kwargs, self._batch_dim))
        self._batches.append(self._current)

    def _on_forward(self, site: Site, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        if not self._recording() or site.path in self.unsupported:
            return
        state = _checkpoint_state()
        if state == "recompute" or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # a recomputation is picked up by the pre-hook; an output without gradient gets none
        if not any(site.trainable(role) for _, role in site.parts):
            return
        try:
            self._start_call(site, args, kwargs, output, deferred=state == "forward")
        except Exception as exc:  # noqa: BLE001 - a measurement problem must not stop training
            self._fail(site, exc)

    def _start_call(self, site: Site, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor,
                    *, deferred: bool) -> None:
        x = input_of(args, kwargs)
        problem = self._check_input(site, x)
        if problem:
            self._mark(site, problem)
            return
        assert x is not None
        if self._current is None or (not self._current.from_model and self._current.per_target is not None
                                     and torch._C._current_graph_task_id() == -1):
            # Submodules called without the model: a call after the last micro-batch's backward starts the next.
            self._current = MicroBatch(x.shape[self._batch_dim], from_model=False)
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
            problem = check_formula(site.kind, site.module, x, output)
            if problem:
                self._mark(site, problem)
                return
            site.checked = True
        call = Call(site, mb, None if deferred else x.detach(), deferred=deferred)
        if deferred:
            earlier = site.deferred() if site.deferred is not None else None
            if earlier is not None and not earlier.done:
                self._mark(site, "called more than once per forward inside non-reentrant gradient checkpointing")
                return
            site.deferred = weakref.ref(call)
        for group, _ in site.parts:
            state = mb.groups.setdefault(id(group), GroupState())
            if any(stash is None for _, stash in state.done):
                # A partner arriving after an earlier call of this weight finished without keeping its factors
                # (reentrant checkpointing of a reused module): this micro-batch's cross term is lost. Keep the
                # factors from now on.
                mb.invalid.add(group)
                group.keep_stash = True
            state.calls.append(weakref.ref(call))
        output.register_hook(functools.partial(self._on_grad, call))

    def _on_recompute(self, site: Site, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Non-reentrant checkpointing re-runs the forward during backward, possibly stopping inside this module's
        # forward once the last saved tensor is rebuilt: take the input here, before the module runs.
        if torch._C._current_graph_task_id() == -1 or site.deferred is None or not self._attached:
            return
        if _checkpoint_state() != "recompute":
            return
        call = site.deferred()
        x = input_of(args, kwargs)
        if call is None or call.done or call.input is not None or x is None:
            return
        call.input = x.detach()
        if call.grad is not None:
            self._finish(call)

    def _on_grad(self, call: Call, grad: torch.Tensor) -> None:
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

    def _finish(self, call: Call) -> None:
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

    def _accumulate(self, call: Call) -> None:
        site, mb = call.site, call.mb
        assert call.input is not None and call.grad is not None
        site.contributed = True  # before any addition: a failure below must invalidate what was added
        by_role = contributions(site.kind, site.module, call.input, call.grad, self._batch_dim)
        if mb.per_target is None:
            mb.allocate(len(self.columns), call.input.shape[self._batch_dim], call.grad.device)
        for group, role in site.parts:
            if role not in by_role or not site.trainable(role):
                continue
            mine = by_role[role]
            value = self_norm(mine)
            state = mb.groups[id(group)]
            for _, stash in state.done:
                if stash is None:
                    continue
                value = value + 2.0 * cross(stash, mine, id(call))
            pending = [c for c in (ref() for ref in state.calls) if c is not None and not c.done and c is not call]
            stash = make_stash(mine, [(id(c), c.input if c.site.kind == "embedding" else None) for c in pending],
                               group.keep_stash, self._batch_dim) if (pending or group.keep_stash) else None
            state.done.append((id(call), stash))
            if not pending and not group.keep_stash:
                state.done = [(key, None) for key, _ in state.done]  # every call of this weight is in: free
            mb.add(group.column, value)

    # -- problems --------------------------------------------------------------------------------------------
    def _check_input(self, site: Site, x: Any) -> str:
        if not isinstance(x, torch.Tensor):
            return f"called with a {type(x).__name__} input, not a tensor"
        feature_dims = {"embedding": 0, "linear": 1, "conv1d": 1}.get(site.kind,
                                                                      cast(torch.Tensor, site.module.weight).ndim)
        if x.ndim - feature_dims <= self._batch_dim:
            return f"its input of shape {tuple(x.shape)} has no example dimension {self._batch_dim}"
        return ""

    def _mark(self, site: Site, reason: str) -> None:
        if site.path in self.unsupported:
            return
        self.unsupported[site.path] = reason
        if site.contributed and any(group.column < 0 for group, _ in site.parts):
            self._other_broken = True

    def _fail(self, site: Site, exc: Exception) -> None:
        if self._strict:
            raise exc
        self._mark(site, f"{type(exc).__name__} while measuring: {exc}")




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

