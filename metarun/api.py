"""Using a trained model from Python: :func:`load` a run folder or a checkpoint, then adapt and predict.

Example (docs/api.md has the whole walk-through, docs/examples/one_shot_runs.py a script):

    >>> import metarun
    >>> trained = metarun.load("outputs/runs/2026-01-01_12-00-00")  # best.pt of the run folder
    >>> support_x = trained.preprocess(["a.png", "b.png"])          # raw files -> [2, 1, 28, 28]
    >>> params = trained.adapt(support_x, [0, 1])                   # test_inner_steps inner steps
    >>> logits = trained.predict(params, trained.preprocess(["q.png"]))

:meth:`Trained.adapt` and :meth:`Trained.predict` run the algorithm's own inner loop
(``start`` / ``adapt_step`` / ``weights``) and its query prediction (``query_outputs``) exactly as
the runner's evaluation does (:meth:`~metarun.algorithms.base.Algorithm.curve`): for one task, under
``torch.func.vmap`` over a batch of that one task, with no graph kept (``predict`` adapts again from
the support set ``adapt`` kept, in the vmap that predicts, as the runner's evaluation does). Their outputs are therefore the
runner's, bit for bit, for the same episode evaluated on its own. (The runner evaluates its test tasks
100 at a time; vmap over a batch of another size may round the last bits of a float differently,
about 1e-5 in a logit, so against that batch the logits agree to about 1e-5 and the predictions
unless two logits are that close.)

Everything the model needs is in the checkpoint: its config, its weights, the algorithm's own
meta-parameters (Meta-SGD's learned rates, MAML++'s per-step rates and norm weights) and
``model_kwargs``: the sizes the task passed to the model (``out_features`` = ways,
``in_channels``, ``image_size``; the policy's ``obs_dim`` and ``act_dim``; none for sinusoid). The
dataset is not loaded. For an older checkpoint without ``model_kwargs`` the sizes are derived from
the config where the task class says they follow from it (its ``model_sizes``: Omniglot 1 x 28 x 28,
MiniImagenet 3 x 84 x 84, image_folder its channels and image size, sinusoid, Navigation2D), and otherwise read from the task built from the run's config, as the runner builds it
(which loads its data once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from metarun.utils import checkpoint
from metarun.utils.errors import CheckpointError, ConfigError, MetarunError

log = logging.getLogger(__name__)

__all__ = ["Adapted", "Trained", "load"]


class Adapted(dict):
    """The parameters :meth:`Trained.adapt` returns: a plain ``{name: tensor}`` dict (the weights the
    model runs with on the task, as ``torch.func.functional_call`` takes them), which also remembers
    the task's support set and the inner steps taken. :meth:`Trained.predict` adapts again from them
    and predicts in the same ``vmap``, as the runner's evaluation does, so its outputs are the
    runner's bit for bit (a weight the inner loop leaves alone, such as ANIL's body, then stays one
    tensor shared by the batch, as there)."""

    def __init__(self, weights: dict[str, Tensor], support_x: Tensor, support_y: Tensor, steps: int) -> None:
        super().__init__(weights)
        self.support_x, self.support_y = support_x, support_y  # the task's support set
        self.steps = steps  # inner steps taken


@dataclass
class Trained:
    """A trained model, ready to adapt to new tasks; what :func:`load` returns.

    Attributes:
        model: the network, its trained weights loaded, in eval mode, on ``device`` in the run's dtype.
        config: the run's config (as the run resolved it).
        algorithm: the meta-learning algorithm built for ``model``, its own meta-parameters loaded
            (:class:`~metarun.algorithms.base.Algorithm`; :class:`~metarun.algorithms.maml_trpo.MAMLTRPO`
            for a meta-RL run).
        iteration: the training iteration the checkpoint was written at.
        path: the checkpoint file that was loaded.
        model_kwargs: the sizes the model was built with (see the module docstring).
        device, dtype: where the model lives and its float type (the run's ``dtype``).
    """

    model: nn.Module
    config: DictConfig
    algorithm: nn.Module
    iteration: int
    path: Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def test_inner_steps(self) -> int:
        """The inner steps the runner's evaluation takes (``algorithm.test_inner_steps``), the default
        of :meth:`adapt`."""
        return int(self.config.algorithm.test_inner_steps)

    @property
    def transductive(self) -> bool:
        """Whether the runner's evaluation predicted a task's queries as one batch
        (``trainer.transductive``; a run from before that key: Reptile's ``algorithm.transductive``)."""
        return bool(self.config.trainer.get("transductive", self.config.algorithm.get("transductive", True)))

    # --- adapting and predicting ---------------------------------------------------------------

    def adapt(self, support_x, support_y, steps: int | None = None) -> Adapted:
        """Adapt to one task: ``steps`` inner steps (default: the run's ``test_inner_steps``) of the
        algorithm on the support set, as the runner's evaluation takes them.

        Args:
            support_x: the support inputs, ``[examples, ...]`` as the model takes them (images from
                :meth:`preprocess`; sinusoid: ``[examples, 1]``).
            support_y: their targets: class labels ``0..ways-1`` (``[examples]``, any integer type), or
                regression targets (``[examples, 1]``).
            steps: inner steps; 0 gives the meta-learned weights unchanged.

        Returns:
            The adapted weights (:class:`Adapted`, a dict), for :meth:`predict`.
        """
        from torch.func import vmap

        algorithm = self._supervised("adapt")
        steps = self.test_inner_steps if steps is None else int(steps)
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        sx, sy = self._inputs(support_x, "support_x"), self._targets(support_y)
        if len(sx) != len(sy):
            raise ConfigError(f"support_x has {len(sx)} examples but support_y {len(sy)} targets")
        with torch.no_grad():
            weights = vmap(lambda x, y: self._adapted(algorithm, x, y, steps))(sx[None], sy[None])
        return Adapted({k: w[0] for k, w in weights.items()}, sx, sy, steps)

    def _adapted(self, algorithm, x: Tensor, y: Tensor, steps: int) -> dict[str, Tensor]:
        """One task's weights after ``steps`` inner steps: the loop of the runner's evaluation
        (:meth:`~metarun.algorithms.base.Algorithm.curve`), to be run under ``vmap``."""
        state = algorithm.start({k: p.detach() for k, p in self.model.named_parameters()})
        for i in range(steps):
            state = algorithm.adapt_step(state, x, y, i, first_order=True)
        return algorithm.weights(state, steps)

    def predict(self, params: dict[str, Tensor], query_x, support_x=None) -> Tensor:
        """The model's outputs on one task's query inputs, with ``params`` from :meth:`adapt`:
        logits ``[queries, ways]`` for classification, predictions ``[queries, 1]`` for sinusoid.

        The query inputs are predicted as the runner's evaluation predicted them: as one batch (its
        batch norm uses the statistics of the query batch, as in MAML's code), or with
        ``trainer.transductive=false`` each query in one batch with the support set.

        Args:
            params: the weights :meth:`adapt` returned (predict adapts again from the support set they
                remember, inside the vmap that predicts, which makes the outputs the runner's bit for
                bit), or a plain ``{name: tensor}`` dict of the model's weights, used as they are.
            query_x: the query inputs, ``[queries, ...]``.
            support_x: the task's support inputs, for a plain dict of weights with an algorithm that
                predicts with them; taken from ``params`` when it came from :meth:`adapt`.
        """
        from torch.func import vmap

        algorithm = self._supervised("predict")
        qx = self._inputs(query_x, "query_x")
        sx = support_x if support_x is not None else getattr(params, "support_x", None)
        if sx is None:
            if not self.transductive:
                raise ConfigError("this run predicts each query with the task's support set "
                                  "(trainer.transductive=false): pass support_x=, or params from adapt()")
            sx = qx[:0]  # (not used)
        sx = self._inputs(sx, "support_x")
        if isinstance(params, Adapted):  # adapt again inside the vmap that predicts, as the runner does
            sy, steps = params.support_y, params.steps

            def one_task(s: Tensor, y: Tensor, q: Tensor) -> Tensor:
                return algorithm.query_outputs(self._adapted(algorithm, s, y, steps), s, q, self.transductive)

            with torch.no_grad():
                return vmap(one_task)(sx[None], sy[None], qx[None])[0]

        def with_weights(w: dict[str, Tensor], s: Tensor, q: Tensor) -> Tensor:  # a dict of the user's
            return algorithm.query_outputs(w, s, q, self.transductive)

        with torch.no_grad():
            return vmap(with_weights)({k: v[None] for k, v in params.items()}, sx[None], qx[None])[0]

    # --- raw inputs ----------------------------------------------------------------------------

    def preprocess(self, images) -> Tensor:
        """Raw images, turned into the float tensor the model was trained on, exactly as training did.

        Omniglot: :func:`metarun.data.omniglot.preprocess_image` (105x105 drawing -> 28x28 LANCZOS,
        inverted); MiniImagenet: :func:`metarun.data.miniimagenet.preprocess_image` (RGB, 84x84 LANCZOS);
        image_folder: its ``decode_image`` at the task's ``image_size`` and ``channels``. Then, as the
        task samples episodes: uint8 -> the run's dtype, divided by 255, channels first.

        Args:
            images: one image or a sequence of them, each its encoded bytes (PNG, JPEG), a file path,
                a binary file or a PIL image.

        Returns:
            ``[N, C, H, W]`` for a sequence, ``[C, H, W]`` for one image; on the model's device.

        Raises:
            MetarunError: the run's task has no image preprocessing here (sinusoid, meta-RL, a task of
                your own: build the input tensors yourself), or an image cannot be used.
        """
        from metarun.data.images import is_raw_image

        one = _preprocessor(self.config)
        if is_raw_image(images):
            return self._scaled(_read(one, images, 0))
        images = list(images)
        if not images:
            raise ConfigError("preprocess() got no images")
        return torch.stack([self._scaled(_read(one, image, i)) for i, image in enumerate(images)])

    # --- helpers -------------------------------------------------------------------------------

    def _scaled(self, pixels: np.ndarray) -> Tensor:
        """uint8 ``[C, H, W]`` -> the run's dtype / 255, on the device (as the task's episodes)."""
        return torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).to(self.dtype) / 255.0

    def _supervised(self, what: str) -> nn.Module:
        if self.config.trainer.name != "supervised":
            raise MetarunError(f"{what}() adapts to a supervised task; a meta-RL policy adapts on rollouts in its "
                               f"environments: 'metarun evaluate={self.path}' runs the paper's protocol")
        return self.algorithm

    def _inputs(self, x, name: str) -> Tensor:
        x = torch.as_tensor(x, device=self.device)
        if not x.is_floating_point():
            raise ConfigError(f"{name} must be float inputs (images from preprocess()), got {x.dtype}")
        return x.to(self.dtype)

    def _targets(self, y) -> Tensor:
        y = torch.as_tensor(y, device=self.device)
        return y.to(self.dtype) if y.is_floating_point() else y.long()


# --- loading --------------------------------------------------------------------------------------


def load(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """Load a trained model from a run folder or a checkpoint file, without loading its dataset.

    Args:
        path: a run folder (its ``checkpoints/best.pt``, else ``checkpoints/last.pt``: the checkpoint
            ``metarun evaluate=RUN`` tests) or a checkpoint file.
        device: where to put the model (``cpu``, ``cuda``, ``cuda:1``, ``auto``).

    Returns:
        :class:`Trained`: the model (eval mode), the config, the algorithm, the iteration.

    Raises:
        CheckpointError: no checkpoint there, an unreadable one, or weights that do not fit the model
            its config describes (a :class:`~metarun.utils.errors.MetarunError`, with a one-line message).
    """
    from hydra.utils import instantiate

    from metarun.utils.runtime import resolve_device

    path = Path(path).expanduser()
    best = path / checkpoint.CHECKPOINT_DIR / checkpoint.BEST
    name = checkpoint.BEST if path.is_dir() and best.is_file() else checkpoint.LAST
    file = checkpoint.find_checkpoint(path, name)
    state = checkpoint.load(file, map_location="cpu")
    config = _config(state["config"])
    device = resolve_device(str(device))
    dtype = getattr(torch, str(config.get("dtype", "float32")))
    model_kwargs = state.get("model_kwargs")
    if model_kwargs is None:  # a checkpoint from before they were saved
        model_kwargs = _derived_model_kwargs(config, file, device, dtype)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
        try:
            model = instantiate(config.model, **model_kwargs)
            algorithm = _algorithm(config, model)
        except MetarunError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot rebuild model {config.model.get('_target_')} with sizes "
                                  f"{model_kwargs} ({_one_line(exc)})") from exc
    model.to(device=device, dtype=dtype)
    algorithm.to(device=device, dtype=dtype)
    for part, module in (("model", model), ("algorithm", algorithm)):
        try:
            module.load_state_dict(state.get(part, {}))
        except RuntimeError as exc:
            raise CheckpointError(f"{file}: the saved {part} weights do not fit the {part} its config describes "
                                  f"(sizes {model_kwargs}): {_one_line(exc)}") from exc
    model.eval()
    return Trained(model, config, algorithm, int(state["iteration"]), file, dict(model_kwargs), device, dtype)


def _config(saved: dict) -> DictConfig:
    """The saved config as this version reads it (newer settings at their defaults), or as saved when
    its task or model is one of the user's own that the schemas do not know."""
    from omegaconf.errors import OmegaConfBaseException

    from metarun.config import typed

    cfg = OmegaConf.create(saved)
    try:
        return typed(cfg)
    except (ConfigError, OmegaConfBaseException):
        return cfg


def _algorithm(config: DictConfig, model: nn.Module) -> nn.Module:
    """The algorithm as the run's trainer builds it."""
    if config.trainer.name == "rl":
        from metarun.algorithms.maml_trpo import MAMLTRPO

        return MAMLTRPO(config.algorithm, model)
    from metarun.algorithms import build

    loss_fn = getattr(_task_class(config), "loss_fn", None)  # a class attribute: the task (its data) is not built
    if loss_fn is None:
        raise CheckpointError(f"task {config.task._target_} has no loss_fn")
    return build(config.algorithm, model, loss_fn)


def _task_class(config: DictConfig):
    """The run's task class (not built: its data is not loaded)."""
    from hydra.utils import get_class

    try:
        return get_class(config.task._target_)
    except Exception as exc:
        raise CheckpointError(f"task {config.task._target_} cannot be imported ({_one_line(exc)})") from exc


def _derived_model_kwargs(config: DictConfig, file: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """The model's sizes for a checkpoint without ``model_kwargs``: from the config where the task class
    says they follow from it (``model_sizes``), else from the task built from the config (as the runner
    builds it, loading its data)."""
    from hydra.utils import instantiate

    sizes = getattr(_task_class(config), "model_sizes", lambda task: None)(config.task)
    if sizes is not None:
        return dict(sizes)
    log.warning("%s has no model_kwargs (written before checkpoints carried the model's sizes): building task %s "
                "from its config to read them", file, config.task.get("name", config.task._target_))
    try:
        if config.trainer.name == "rl":
            from metarun.trainers.rl import policy_sizes

            return policy_sizes(instantiate(config.task))
        return dict(getattr(instantiate(config.task, device=device, dtype=dtype), "model_kwargs", {}))
    except Exception as exc:
        raise CheckpointError(f"{file} was written before checkpoints carried the model's sizes, and building its "
                              f"task to find them failed: {_one_line(exc)}") from exc


def _preprocessor(config: DictConfig):
    """The task family's per-image function (its ``image_transform``), returning uint8 ``[C, H, W]``."""
    transform = getattr(_task_class(config), "image_transform", None)
    if transform is None:
        raise MetarunError(f"preprocess(): task {config.task.get('name', config.task._target_)} has no image "
                           "preprocessing in metarun; give adapt() and predict() float tensors shaped as the model's "
                           "inputs")
    return transform(config.task)


def _read(one, image, index: int) -> np.ndarray:
    """``one(image)``; an image that cannot be read is a one-line DataError naming it."""
    import os

    from metarun.data.cache import DataError

    try:
        return one(image)
    except TypeError:
        raise
    except Exception as exc:  # PIL raises many types for a file it cannot read
        which = f"{image}" if isinstance(image, (str, os.PathLike)) else f"#{index} ({type(image).__name__})"
        why = f": {exc}" if isinstance(exc, MetarunError) else f" cannot be read ({_one_line(exc)})"
        raise DataError(f"preprocess(): image {which}{why}") from exc


def _one_line(exc: BaseException) -> str:
    """:func:`~metarun.data.cache.one_line`, cut to 300 characters (a constructor's message can be long)."""
    from metarun.data.cache import one_line

    text = one_line(exc)
    return text if len(text) <= 300 else text[:297] + "..."
