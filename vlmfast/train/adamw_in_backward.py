"""AdamW stepped inside the backward: each parameter is updated as soon as its gradient is
complete, and the gradient is dropped at once, so a training step never holds the gradients of
the whole model (for SmolVLM2-256M in float32 about 1 GiB less at the peak).

The update is AdamW's, parameter for parameter: after `loss.backward()` the weights and the
optimizer state equal those of `torch.optim.AdamW(...).step()` on the same gradients. What it
gives up: anything that needs every gradient before the first update (global gradient-norm
clipping, accumulation over micro-batches, inspecting .grad after the backward).

It also registers each parameter with vlmfast.ops.weight_updates, so an op that makes a
parameter's gradient in slices can have it updated slice by slice: an untied language-model
head under ops.linear_cross_entropy(weight_used_once=True) is updated without its (V, D)
gradient ever existing whole (113 MiB for SmolVLM2-256M in float32).

    stepper = AdamWInBackward(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss.backward()          # updates the weights; every .grad is None afterwards
    stepper.set_lr(new_lr)   # a schedule: between steps
    stepper.remove()         # back to plain gradients
"""

import torch
from torch.optim.adamw import adamw

from vlmfast.ops import weight_updates


class AdamWInBackward:
    """params: an iterable of parameters (those without requires_grad are skipped) or of
    parameter-group dicts {"params": [...], **AdamW options}; **defaults: torch.optim.AdamW's
    options (lr, betas, eps, weight_decay, fused, ...). fused=None picks the fused kernel where
    torch has it (CPU and CUDA floating-point parameters)."""

    def __init__(self, params, **defaults):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.optimizers: dict[torch.nn.Parameter, torch.optim.AdamW] = {}
        self._handles = []
        for group in groups:
            options = {**defaults, **{k: v for k, v in group.items() if k != "params"}}
            for param in group["params"]:
                if not isinstance(param, torch.Tensor):
                    raise TypeError(f"params: expected tensors or parameter groups, got {type(param).__name__}")
                if not param.requires_grad or param in self.optimizers:
                    continue
                kwargs = dict(options)
                if kwargs.get("fused") is None:
                    kwargs["fused"] = param.device.type in ("cpu", "cuda") and param.is_floating_point()
                # one optimizer per parameter: its step touches that parameter only
                self.optimizers[param] = torch.optim.AdamW([param], **kwargs)
                self._handles.append(param.register_post_accumulate_grad_hook(self._step))
                self._handles.append(weight_updates.register(param, self._begin_slices))
        if not self.optimizers:
            raise ValueError("params: expected at least one parameter that requires grad, got none")

    def _step(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:  # the hook fires for a weight updated in slices too, with no gradient
            return
        param.grad = None  # the gradient's memory is free before the backward goes on
        update = self._begin_slices(param)
        if update is not None:  # torch's functional AdamW on the whole tensor: the same update
            update(..., grad)  # (every element) without optimizer.step()'s per-call overhead (~0.3 ms)
            return
        param.grad = grad  # the first step: torch's step creates the state
        self.optimizers[param].step()
        param.grad = None

    def _begin_slices(self, param: torch.Tensor):
        """The update of `param` slice by slice for one backward (vlmfast.ops.weight_updates:
        an op that makes param's whole gradient in slices, e.g. an untied language-model head's
        in ops.linear_cross_entropy). AdamW is elementwise, so rows updated from their rows of
        the gradient equal the whole update; the step counter advances once, here. None (the
        op then hands over the whole gradient as usual) on the first step, where torch's step
        creates the state, or when param already holds part of a gradient."""
        optimizer = self.optimizers[param]
        state = optimizer.state.get(param)
        group = optimizer.param_groups[0]
        if not state or param.grad is not None or group["differentiable"]:
            return None
        step_before = state["step"].clone()
        state["step"] += 1
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        whole = param.detach()

        def update(rows: slice, grad: torch.Tensor) -> None:
            adamw([whole[rows]], [grad], [state["exp_avg"][rows]], [state["exp_avg_sq"][rows]],
                  [state["max_exp_avg_sq"][rows]] if amsgrad else [],
                  [step_before.clone()],  # the functional advances the counter it is given
                  foreach=group["foreach"], capturable=group["capturable"], fused=group["fused"],
                  amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

        return update

    @property
    def param_groups(self) -> list[dict]:
        """Every per-parameter optimizer's groups (one each), in the order of the parameters:
        a trainer's schedule sets group["lr"] here as on torch.optim.AdamW."""
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> list:
        """The per-parameter optimizer states, in the order of the parameters given."""
        return [optimizer.state_dict() for optimizer in self.optimizers.values()]

    def load_state_dict(self, states: list) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"states: expected {len(self.optimizers)} optimizer states, got {len(states)}")
        for optimizer, state in zip(self.optimizers.values(), states):
            optimizer.load_state_dict(state)

    def remove(self) -> None:
        """Stops stepping in the backward (gradients accumulate in .grad again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
