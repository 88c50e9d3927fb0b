"""The learner's optimiser: ``torch.optim.Adam``'s update, without ``torch._dynamo``.

Every method of ``torch.optim.Optimizer`` that the learner calls (``__init__`` through
``add_param_group``, ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``) is wrapped for
``torch.compile`` by ``torch._disable_dynamo`` or ``_use_grad_for_differentiable``, and both import
``torch._dynamo`` (sympy and the inductor config with it) on their first call: about 70 MiB of
resident memory and a second of start-up in an agent that never compiles anything (see
``bench.footprint``). A subclass would inherit the wrappers through ``__init__``.

``Adam`` here keeps ``torch.optim.Adam``'s interface as the learner and the checkpoints use it
(``param_groups``, ``state``: parameter → ``step``/``exp_avg``/``exp_avg_sq``, ``zero_grad``,
``step``, ``state_dict``, ``load_state_dict``, the class name) and hands the arithmetic to torch's
own functional ``torch.optim.adam.adam`` with the same arguments ``torch.optim.Adam.step`` passes,
so its parameters and state stay bit-identical to ``torch.optim.Adam``'s (``tests/test_optim.py``),
and a checkpoint written with either loads into the other. Only the learning rate is a choice;
every other option keeps torch's default.

>>> model = torch.nn.Linear(3, 2)
>>> opt = Adam(model.parameters(), lr=1e-3)
>>> model(torch.ones(1, 3)).sum().backward()
>>> opt.step()
>>> opt.zero_grad(set_to_none=True)
>>> float(opt.state[model.weight]["step"])
1.0
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim.adam import adam

#: ``torch.optim.Adam``'s options apart from ``lr``, at its defaults: the keys of each param group.
OPTIONS: dict[str, Any] = {
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": False,
}


class Adam:
    """Adam over ``params`` (one param group), as ``torch.optim.Adam(params, lr=lr)`` computes it."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        group_params = list(params)
        if not group_params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups: list[dict[str, Any]] = [{"params": group_params, "lr": lr, **OPTIONS}]
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step for every parameter that has a gradient."""
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # As torch.optim.Adam initialises it: the step counter a float32 scalar on the
                    # CPU (its ``_get_scalar_dtype`` for float32 models), the moments zeros.
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            # The arguments torch.optim.Adam.step passes, so that adam() picks the same kernel.
            adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                has_complex=any(torch.is_complex(p) for p in params),
                decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``'s layout: state and param groups by parameter index.

        The state's tensors are the live ones, not copies (as torch's).
        """
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in self.param_groups
        ]
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take a ``state_dict()`` of this optimiser or of a ``torch.optim.Adam`` over the same parameters.

        Raises ValueError, changing nothing, when the groups do not match this optimiser's
        parameters or set an option other than ``lr`` away from torch's default (this optimiser's
        step does not implement the others: AMSGrad, fused, capturable, ...).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        by_index: dict[Any, torch.Tensor] = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
            # A key missing from an older torch's state dict means its default, as Adam.__setstate__ reads it.
            changed = [k for k, default in OPTIONS.items() if saved.get(k, default) != default]
            if changed:
                raise ValueError(f"this Adam keeps torch's defaults for {', '.join(changed)}")
            by_index.update(zip(saved["params"], group["params"]))
        stray = set(state_dict["state"]) - set(by_index)
        if stray:
            raise ValueError(f"loaded state dict has state for unknown parameters {sorted(stray)}")
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for i, values in state_dict["state"].items():
            p = by_index[i]
            # As torch.optim.Optimizer.load_state_dict casts them: moments to the parameter's dtype
            # and device, the CPU step counter as it is.
            state[p] = {
                k: v.to(dtype=p.dtype, device=p.device) if k != "step" and isinstance(v, torch.Tensor) else v
                for k, v in values.items()
            }
        for group, saved in zip(self.param_groups, saved_groups):
            group["lr"] = saved["lr"]
        self.state = state
