"""MAML (Finn, Abbeel & Levine 2017, arXiv 1703.03400) and its first-order approximation.

The inner loop takes ``inner_steps`` SGD steps of rate alpha on each task's support set; the outer
objective is the query loss at the adapted parameters, and its gradient flows back through the inner
steps (Hessian-vector products). ``first_order=true`` (``algorithm=fomaml``) detaches the inner
gradients and drops that term. This is exactly :class:`~metarun.algorithms.base.Algorithm`'s
behaviour, which the other algorithms modify.
"""

from __future__ import annotations

from metarun.algorithms.base import Algorithm


class MAML(Algorithm):
    """MAML; first order when ``algorithm.first_order`` is true."""
