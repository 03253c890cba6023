"""learn2learn's ``OmniglotCNN`` written as a metarun model, for parity runs only: metarun's MAML
family trained on the reference's network, so that what is left between the two curves is the
algorithm and its loop, not the network (as ``model.init=xavier`` did for Reptile and iMAML).

Written from learn2learn db5cee3's ``learn2learn/vision/models/cnn4.py`` (``OmniglotCNN`` ->
``ConvBase(hidden=64, channels=1, max_pool=False, layers=4)``; no code copied):

* 4 x [3x3 conv, 64 filters, stride 2, padding 1; xavier-uniform weight (gain 1), zero bias ->
  batch norm (eps 1e-5; weight ~ U(0, 1), zero bias) -> ReLU], 28 -> 14 -> 7 -> 4 -> 2;
* the mean over the 2 x 2 positions (64 features), then ``Linear(64, ways)`` with weight ~ N(0, 1)
  and zero bias. 112,261 parameters for 5 ways, as learn2learn's.

Batch norm is metarun's :class:`~metarun.models.norm.BatchStatNorm` (the statistics of the batch it is
given), which is what the reference's ``BatchNorm2d`` computes in the ``train()`` mode it never
leaves (parity/learn2learn/README.md). Use it with::

    bash parity/metarun.sh maml 0 1000 250 model=custom \\
        model._target_=parity.learn2learn.omniglot_cnn.OmniglotCNN hydra.run.dir=parity/runs/maml/metarun-l2lcnn/seed0
"""

from __future__ import annotations

from torch import Tensor, nn

from metarun.models.norm import BatchStatNorm


class OmniglotCNN(nn.Module):
    def __init__(self, in_channels: int = 1, out_features: int = 5, image_size: int = 28, hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            conv = nn.Conv2d(channels, hidden, 3, stride=2, padding=1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            norm = BatchStatNorm(hidden)
            nn.init.uniform_(norm.weight)
            layers += [conv, norm, nn.ReLU()]
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, out_features)
        nn.init.normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
