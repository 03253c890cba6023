"""Hessian-vector products of a per-sample loss on an MLP's outputs, in closed form layer by layer, for
many tasks at once (MAML-TRPO's Fisher-vector products, :func:`metarun.meta.policy_gradient.meta_curvature`).

For ``mu = MLP(x; W, b)`` (linear layers, ReLU or tanh between them) and a loss ``sum_n l(mu_n, s)`` of the
outputs and of a parameter ``s`` outside the network (the policy's log-std), the product of the loss's
Hessian with a direction ``(dW, db, ds)`` is the directional derivative of its gradient: a forward pass
of tangents (``dz = dh W^T + h dW^T + db``), the loss's second derivatives in ``mu`` and ``s``, then the
backward pass's own directional derivative (``d(delta^T h) = d(delta)^T h + delta^T dh``, and through each
activation its derivative, plus its second derivative times the tangent for tanh). The forward
activations and the backward pass's ``delta`` do not depend on the direction: they are computed once, so a
product costs its matrix products only, about half of autograd's double backward through the gradient's
graph (which also accumulates, zero-fills and re-threads every intermediate). When the loss's gradient in
``mu`` is zero (a KL at its minimum) the terms with ``delta`` vanish and are skipped.

Every tensor carries the tasks as its first axis: weights ``[tasks, out, in]``, inputs ``[tasks, n, in]``.
``tests/test_rl_core.py`` holds these products equal to autograd's and to dense Hessians in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class OutputCurvature:
    """The loss's derivatives at the network's outputs ``mu`` ``[tasks, n, d]`` and at ``s`` ``[tasks, d]``
    (the loss is a sum over samples of terms separable in the output dimensions ``d``)."""

    grad_mu: Tensor | None  # dl/dmu per sample; None where it is zero (no delta terms)
    mu_mu: Tensor  # d2l/dmu2, diagonal, per sample
    mu_s: Tensor | None  # d2l/dmu ds, diagonal, per sample; None where zero
    s_s: Tensor  # d2l/ds2 summed over the samples, [tasks, d]


class MLPCurvature:
    """The forward pass of an MLP per task, kept for Hessian-vector products of losses of its outputs.

    Args:
        weights, biases: per layer, ``[tasks, out, in]`` and ``[tasks, out]``.
        activation: ``"relu"`` or ``"tanh"``, between layers (none after the last).
        x: inputs ``[tasks, n, in]``.
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor], activation: str, x: Tensor):
        self.weights, self.biases, self.activation = weights, biases, activation
        self.inputs = [x]  # the input of each layer
        self.slopes: list[Tensor] = []  # the activation's derivative at each hidden layer
        self.bends: list[Tensor | None] = []  # its second derivative (None for ReLU: zero)
        z = x
        for i, (w, b) in enumerate(zip(weights, biases)):
            z = torch.baddbmm(b.unsqueeze(1), self.inputs[-1], w.transpose(1, 2))
            if i < len(weights) - 1:
                if activation == "relu":
                    h, slope, bend = z.clamp_min(0), (z > 0).to(z.dtype), None
                else:
                    h = torch.tanh(z)
                    slope = 1 - h * h
                    bend = -2 * h * slope
                self.inputs.append(h)
                self.slopes.append(slope)
                self.bends.append(bend)
        self.mean = z
        self.curvature: OutputCurvature | None = None
        self._deltas: list[Tensor] = []  # dl/dz of each layer's output
        self._input_grads: list[Tensor | None] = []  # dl/dh of each layer's input

    def backward(self, grad_mu: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The gradient in the weights and biases of a loss whose gradient at the outputs is ``grad_mu``."""
        grad_w, grad_b, _, _ = self._backward(grad_mu)
        return grad_w, grad_b

    def _backward(self, delta: Tensor):
        """Backpropagation: the gradients and, per layer, dl/dz of its output and dl/dh of its input."""
        grad_w, grad_b, deltas, input_grads = [], [], [], [None]  # the network's input: no gradient needed
        for i in range(len(self.weights) - 1, -1, -1):
            grad_w.insert(0, delta.transpose(1, 2) @ self.inputs[i])
            grad_b.insert(0, delta.sum(1))
            deltas.insert(0, delta)
            if i > 0:
                input_grad = delta @ self.weights[i]
                input_grads.insert(1, input_grad)
                delta = self.slopes[i - 1] * input_grad
        return grad_w, grad_b, deltas, input_grads

    def set_curvature(self, curvature: OutputCurvature) -> tuple[list[Tensor], list[Tensor]]:
        """Set the loss's derivatives for :meth:`product`; returns the loss's gradient in the weights and
        biases (empty lists where ``grad_mu`` is None), whose backward pass the products reuse."""
        self.curvature = curvature
        if curvature.grad_mu is None:
            self._deltas, self._input_grads = [], []
            return [], []
        grad_w, grad_b, self._deltas, self._input_grads = self._backward(curvature.grad_mu)
        return grad_w, grad_b

    def product(self, dw: list[Tensor], db: list[Tensor], ds: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The loss's Hessian times the direction ``(dw, db, ds)`` (shaped as the weights, biases and ``s``)."""
        c = self.curvature
        if c is None:
            raise RuntimeError("call set_curvature() before product()")
        with_delta = c.grad_mu is not None
        # forward: tangents of each layer's input (dh) and output (dz)
        tangents_in: list[Tensor | None] = [None]
        tangents_out: list[Tensor] = []
        for i, (w, x) in enumerate(zip(self.weights, self.inputs)):  # in place: each pass over n costs
            dz = torch.bmm(x, dw[i].transpose(1, 2))
            if tangents_in[i] is not None:
                dz.baddbmm_(tangents_in[i], w.transpose(1, 2))
            dz += db[i].unsqueeze(1)
            tangents_out.append(dz)
            if i < len(self.weights) - 1:
                tangents_in.append(self.slopes[i] * dz)
        d_mu = tangents_out[-1]
        d_delta = c.mu_mu * d_mu
        h_s = c.s_s * ds
        if c.mu_s is not None:
            d_delta = d_delta + c.mu_s * ds.unsqueeze(1)
            h_s = h_s + (c.mu_s * d_mu).sum(1)
        # backward: the directional derivative of each layer's gradient, last layer first
        h_w: list[Tensor] = []
        h_b: list[Tensor] = []
        for i in range(len(self.weights) - 1, -1, -1):
            h_w.insert(0, d_delta.transpose(1, 2) @ self.inputs[i])
            if with_delta and tangents_in[i] is not None:
                h_w[0].baddbmm_(self._deltas[i].transpose(1, 2), tangents_in[i])
            h_b.insert(0, d_delta.sum(1))
            if i > 0:
                d_input = d_delta @ self.weights[i]
                if with_delta:
                    d_input.baddbmm_(self._deltas[i], dw[i])
                d_delta = d_input.mul_(self.slopes[i - 1])
                if with_delta and self.bends[i - 1] is not None:
                    d_delta = d_delta + self.bends[i - 1] * tangents_out[i - 1] * self._input_grads[i]
        return h_w, h_b, h_s


def mlp_layers(policy: nn.Module) -> tuple[list[tuple[str, str]], str] | None:
    """The ``(weight, bias)`` parameter names of each layer and the activation, when ``policy`` is a
    :class:`~metarun.models.GaussianPolicy` whose mean is a plain MLP (linear layers with ReLU or tanh
    between them); None for any other network (the caller falls back to autograd)."""
    from metarun.models.policy import GaussianPolicy

    net = getattr(getattr(policy, "mean", None), "net", None)
    if not isinstance(policy, GaussianPolicy) or not isinstance(net, nn.Sequential) or policy.mean.images:
        return None
    modules = list(net)  # Linear, activation, Linear, ..., Linear
    linear, between = modules[0::2], {type(m) for m in modules[1::2]}
    if len(modules) % 2 == 0 or not all(isinstance(m, nn.Linear) and m.bias is not None for m in linear):
        return None
    if not between <= {nn.ReLU, nn.Tanh} or len(between) > 1:
        return None
    layers = [(f"mean.net.{i}.weight", f"mean.net.{i}.bias") for i in range(0, len(modules), 2)]
    return layers, "tanh" if nn.Tanh in between else "relu"
