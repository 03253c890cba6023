"""A user's own model with torch's batch norm is refused in one line naming the layer: under vmap,
which evaluation always uses, its second-order meta-gradients are wrong and its running
statistics cannot be updated (tests/test_meta_gradients.py measures the first)."""

from __future__ import annotations

import textwrap

import pytest
from torch import nn

from metarun.meta import refuse_torch_batch_norm
from metarun.models import MLP
from metarun.utils.errors import ConfigError
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.unit

def with_torch_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def test_torch_batch_norm_is_refused_by_name_and_metarun_norm_is_not():
    with pytest.raises(ConfigError, match=r"torch's batch norm \(1: BatchNorm1d\).*BatchStatNorm"):
        refuse_torch_batch_norm(with_torch_norm())
    refuse_torch_batch_norm(MLP(1, 1, [8], batch_norm=True))  # metarun's own norm: nothing to refuse


USER_MODULE = textwrap.dedent('''
    from torch import nn


    class TorchNormNet(nn.Sequential):
        """A user's regressor with torch's batch norm; takes the mlp config's keys."""

        def __init__(self, in_features=1, out_features=1, hidden_sizes=(16,), activation="relu", batch_norm=False):
            super().__init__(nn.Linear(in_features, hidden_sizes[0]), nn.BatchNorm1d(hidden_sizes[0]), nn.ReLU(),
                             nn.Linear(hidden_sizes[0], out_features))
''')


def test_cli_refuses_a_user_model_with_torch_batch_norm(cli):
    (cli.cwd / "usernets.py").write_text(USER_MODULE)  # a module in the folder metarun runs from
    for batching in ("auto", "loop", "vmap"):
        proc = cli("debug=smoke", "model._target_=usernets.TorchNormNet", f"algorithm.batching={batching}")
        assert_one_line_error(proc, "the model has torch's batch norm (1: BatchNorm1d)", "metarun.models.BatchStatNorm")
    assert not (cli.cwd / "outputs").exists()  # refused before training: no run folder left
