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

The package: :mod:`~lorascope.record.per_example.hooks` (the hook class, :class:`PerExampleNorms`),
:mod:`~lorascope.record.per_example.layers` (which modules are measured, and why not the others),
:mod:`~lorascope.record.per_example.kernels` (the tensor arithmetic) and :mod:`~lorascope.record.per_example.state`
(the per-call and per-micro-batch bookkeeping).
"""

from lorascope.record.per_example.hooks import PerExampleNorms

__all__ = ["PerExampleNorms"]
