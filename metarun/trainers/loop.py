"""The training loop both trainers share, written once: stopping on signals, the training clock
and time budget, the cadence of logging, validation and checkpoints, TensorBoard, and stopping on a
non-finite loss with the last good checkpoint named.

A trainer supplies what one iteration does and how to save and validate; :func:`train_loop` does
the rest, in the same order for every trainer.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from metarun import distributed
from metarun.distributed import DistributedError
from metarun.trainers.results import flat_config
from metarun.utils import checkpoint
from metarun.utils.errors import DivergedError, MetarunError
from metarun.utils.runtime import CoreWatch, oversubscribed

log = logging.getLogger(__name__)


WATCH_SECONDS = 30.0
"""How often (at a log iteration) training looks whether other work crowds its CPU threads."""

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))
"""Ctrl-C, a kill, and the signal a scheduler sends before preempting a job or at its time limit
(submitit's SIGUSR2, sent ``signal_delay_s`` before the end on SLURM)."""


class StopRequest:
    """Ctrl-C / SIGTERM / SIGUSR2: finish the current iteration, checkpoint, stop. A second Ctrl-C
    aborts. A SIGUSR2 whose earlier handler was a scheduler's (submitit's, which requeues the job)
    is handed on to it once the checkpoint is written (:meth:`hand_on`)."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}  # the handlers before ours
        self.requested: str | None = None  # the signal this process received
        self.agreed: str | None = None  # under torchrun: the stop all ranks agreed on (agreed_stop)

    def now(self) -> str | None:
        """The stop to act on: this process's signal, or under torchrun the agreed one only (a rank
        that left the loop alone would wait for the others in a collective for ever)."""
        return self.requested if distributed.world_size() == 1 else self.agreed

    def hand_on(self) -> None:
        """After the checkpoint: give a SIGUSR2 to the handler that was there before ours, when
        there was one (submitit's: it requeues the job, whose next attempt resumes from the
        checkpoint, and exits)."""
        usr2 = getattr(signal, "SIGUSR2", None)
        scheduler = schedulers_handler(self.previous, usr2)
        if (self.now() or "").startswith("SIGUSR2") and scheduler is not None:  # (under torchrun: any rank's)
            log.info("SIGUSR2: checkpoint written; handing the signal on to the scheduler's handler (requeue)")
            signal.signal(usr2, scheduler)
            signal.raise_signal(usr2)

    def __call__(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """A stop signal outside the training loop (set-up, the final test), where no checkpoint can be
    written: its text names the signal, the phase, and how to carry on."""


class PhaseStop:
    """The stop-signal handler of a phase outside the training loop (:func:`phase`)."""

    def __init__(self, name: str, recover: str) -> None:
        self.name, self.recover = name, recover
        self.previous: dict[int, object] = {}

    def __call__(self, signum, frame) -> None:
        scheduler = schedulers_handler(self.previous, signum)
        if signum == getattr(signal, "SIGUSR2", None) and scheduler is not None:
            scheduler(signum, frame)  # submitit's: it requeues the job, which starts this phase again
            return
        name = signal.Signals(signum).name
        why = " (under torchrun: another rank failed; torchrun's report names it)" if name == "SIGTERM" and distributed.world_size() > 1 else ""
        raise Interrupted(f"stopped by {name} during {self.name}{why}; {self.recover}")


def schedulers_handler(previous: dict, signum) -> Callable | None:
    """The handler a scheduler (submitit) installed for ``signum`` before metarun's own, if any."""
    handler = previous.get(signum)
    while isinstance(handler, PhaseStop):
        handler = handler.previous.get(signum)
    return handler if callable(handler) else None


@contextmanager
def phase(name: str, recover: str):
    """Name a phase of a run (set-up, training, the final test) and how to carry on after it
    stopped: a stop signal outside the training loop (which stops at a checkpoint instead), or
    under torchrun another rank lost, ends the run with one line that says both."""
    handler = PhaseStop(name, recover)
    for sig in STOP_SIGNALS:
        try:
            handler.previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some launchers): no handler, no harm
            pass
    try:
        yield
    except DistributedError as exc:
        if exc.phase is not None:  # an inner phase named it already
            raise
        raise DistributedError(exc.what, exc.cause, recover, phase=name) from exc
    finally:
        for sig, old in handler.previous.items():
            signal.signal(sig, old)


def training_phase(run_dir: Path):
    """:func:`phase` of a trainer's training (the loop inside checkpoints on a signal itself)."""
    return phase("training", f"metarun resume={run_dir} continues from its last checkpoint")


@contextmanager
def test_phase(cfg: DictConfig, run_dir: Path, eval_only: bool):
    """:func:`phase` of the final test (or of ``evaluate=``), announced in the log."""
    with phase("the evaluation" if eval_only else "the final test",
               f"{'' if eval_only else 'training is complete: '}metarun evaluate={run_dir} tests it again"):
        log.info("testing on %d tasks (trainer.test_tasks, seed %d)", cfg.trainer.test_tasks, cfg.trainer.test_seed)
        yield


@contextmanager
def stop_on_signals():
    handler = StopRequest()
    previous = handler.previous
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some launchers): no handler, no harm
            pass
    try:
        yield handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class TrainClock:
    """Seconds spent training, across resumes (``seconds`` goes into checkpoints), not counting
    what runs inside ``paused()`` (validation, checkpoints); and this invocation's time budget,
    ``trainer.max_minutes`` of wall-clock time (None: no limit). On a GPU the clock waits for the
    queued steps before it is read, so the seconds are the GPU's, not how fast Python queued them."""

    def __init__(self, device: torch.device, seconds: float = 0.0, max_minutes: float | None = None) -> None:
        self.device, self.seconds, self.max_minutes = device, seconds, max_minutes
        self.deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
        self.start = time.perf_counter()

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds, self.start = self.seconds + now - self.start, now
        return self.seconds

    def log_stop(self, iteration: int, run_dir: Path) -> None:
        """Say that the budget ended training early, and how to continue."""
        log.info("trainer.max_minutes=%g reached at iteration %d: stopped early (checkpoint written; "
                 "metarun resume=%s continues the run)", self.max_minutes, iteration, run_dir)

    @contextmanager
    def paused(self):
        self.read()
        try:
            yield self
        finally:
            self.start = time.perf_counter()


def last_good_checkpoint(run_dir: Path, iteration: int, interval: int) -> str:
    """The end of a divergence message: where training can be resumed from, if anywhere."""
    path = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST
    if iteration > 0 and path.is_file():
        return f"Last good checkpoint: iteration {iteration}, {path}"
    return (f"No checkpoint had been written yet (the first was due at iteration {interval}, "
            f"trainer.checkpoint_interval); the log and TensorBoard events are in {run_dir}")


def open_writer(run_dir: Path, cfg: DictConfig, iteration: int) -> SummaryWriter | None:
    """The run's TensorBoard writer (events past ``iteration`` from an earlier try are dropped);
    a fresh run also gets its hyperparameter table, once. Under torchrun only rank 0 writes (None
    elsewhere)."""
    if not distributed.is_main():
        return None
    writer = SummaryWriter(run_dir / "tb", purge_step=iteration or None)
    if iteration == 0:
        writer.add_text("hparams", hparams_markdown(cfg), 0)
    return writer


def hparams_markdown(cfg: DictConfig) -> str:
    return "|key|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in flat_config(cfg).items())




Step = Callable[[], tuple[Tensor, dict[str, Tensor]]]


def agreed_stop(stop: StopRequest, out_of_time: bool) -> bool:
    """Under torchrun, a stop that any rank asks for (a signal, its clock) is every rank's stop, in
    the same iteration, so no rank waits in a collective for one that left; every rank learns which
    signal it was and which rank received it (the highest in STOP_SIGNALS' order: SIGUSR2, a
    scheduler's, wins, so every rank hands it on). Returns out_of_time."""
    if distributed.world_size() == 1:
        return out_of_time
    names, world = [s.name for s in STOP_SIGNALS], distributed.world_size()
    mine = names.index(stop.requested) + 1 if stop.requested in names else 0
    signal_and_rank, out_of_time = distributed.max_over_ranks(mine * world + distributed.rank() if mine else 0,
                                                              int(out_of_time))
    if signal_and_rank:
        name, sender = names[signal_and_rank // world - 1], signal_and_rank % world
        stop.agreed = name if sender == distributed.rank() else f"{name} (on rank {sender})"
    return bool(out_of_time)


def train_loop(run, step: Step, save: Callable[[], Path],
               validate: Callable[[SummaryWriter], dict[str, float]] | None = None,
               postfix: dict[str, str] | None = None, log_lines: bool = False) -> None:
    """Meta-train ``run`` from ``run.iteration`` to ``trainer.iterations``, or until
    ``trainer.max_minutes`` have passed (then it validates, checkpoints and stops early).

    Args:
        run: a trainer's run: ``cfg``, ``run_dir``, ``device``, ``iteration``, ``train_seconds``.
        step: one iteration; returns its loss (a 0-dim tensor, left on the device: it is checked for
            being finite only at log and checkpoint iterations, so no iteration waits for the GPU;
            under torchrun, the mean over the ranks, so they all see the same)
            and its statistics, averaged and written to TensorBoard as ``train/<name>`` every
            ``trainer.log_interval`` iterations. A :class:`MetarunError` it raises stops the run.
        save: writes ``checkpoints/last.pt`` (called on every rank; rank 0 writes); called every ``trainer.checkpoint_interval``
            iterations, at the end, when the budget ends and on Ctrl-C / SIGTERM.
        validate: writes ``val/`` scalars (given a writer: rank 0) and returns them; every ``trainer.val_interval`` iterations
            and at the end (None: no validation).
        postfix: statistics shown on the progress bar, by the short name to show them under.
        log_lines: also log every logged iteration's statistics as a line.
    """
    cfg, tr = run.cfg, run.cfg.trainer
    writer = open_writer(run.run_dir, cfg, run.iteration)
    first_bad = torch.tensor(-1, device=run.device)  # the first iteration with a non-finite loss
    sums: dict[str, Tensor] = {}
    last_good = run.iteration
    clock = TrainClock(run.device, run.train_seconds, tr.max_minutes)
    start_iteration, start_seconds = run.iteration, run.train_seconds
    if run.iteration < tr.iterations:  # a sitting: this call's stretch of training (a resume starts another)
        run.sittings.append({"from_iteration": run.iteration, "to_iteration": run.iteration, "train_seconds": 0.0,
                             "ms_per_iteration": None, "processes": distributed.world_size()})

    def end_sitting_here() -> None:  # (before each checkpoint, so that it holds the sittings so far)
        done = run.iteration - start_iteration
        seconds = run.train_seconds - start_seconds
        run.sittings[-1].update(to_iteration=run.iteration, train_seconds=seconds,
                                ms_per_iteration=seconds / done * 1e3 if done else None)
    logged = (run.iteration, run.train_seconds)  # the last log's iteration and training seconds
    watch = CoreWatch() if run.device.type == "cpu" else None  # other work crowding the cores: warned once
    bar = tqdm(total=tr.iterations, initial=run.iteration, disable=not tr.progress or not distributed.is_main(),
               desc="meta-train",
               dynamic_ncols=True, mininterval=0.5)
    with stop_on_signals() as stop, logging_redirect_tqdm():
        while run.iteration < tr.iterations and not stop.now():
            try:
                loss, stats = step()
            except DistributedError:
                raise
            except MetarunError as exc:
                raise DivergedError(f"{exc} at iteration {run.iteration + 1}; stopped. "
                                    f"{last_good_checkpoint(run.run_dir, last_good, tr.checkpoint_interval)}") from exc
            first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), run.iteration + 1, first_bad)
            for key, value in stats.items():  # summed in float64, on the device
                sums[key] = sums.get(key, 0.0) + value.double()
            run.iteration += 1
            bar.update()
            at, out_of_time = run.iteration, agreed_stop(stop, clock.out_of_time())
            last = at == tr.iterations or out_of_time
            do_log = at % tr.log_interval == 0
            do_validate = validate is not None and (at % tr.val_interval == 0 or last)
            do_save = at % tr.checkpoint_interval == 0 or last
            if do_log or do_save:
                if first_bad.item() >= 0:
                    bar.close()
                    raise DivergedError(f"non-finite meta-loss at iteration {first_bad.item()}; stopped. "
                                        f"{last_good_checkpoint(run.run_dir, last_good, tr.checkpoint_interval)}")
                if do_log:
                    means = {key: float(total) / tr.log_interval for key, total in sums.items()}
                    sums.clear()
                    seconds = clock.read()  # training time only (validation and checkpoints are paused)
                    if writer is not None:
                        for key, value in means.items():
                            writer.add_scalar(f"train/{key}", value, at)
                        writer.add_scalar("train/iterations_per_s", (at - logged[0]) / max(seconds - logged[1], 1e-9), at)
                    logged = (at, seconds)
                    if getattr(run, "training_log", None) is not None:  # (meta-RL: its curve in results.json)
                        run.training_log.append({"iteration": at, "train_seconds": seconds, **means})
                    bar.set_postfix({short: f"{means[key]:.4g}" for short, key in (postfix or {}).items()})
                    if log_lines:
                        log.info("iteration %d %s", at, " ".join(f"{k}={v:.4g}" for k, v in means.items()))
                    if watch is not None and watch.due(WATCH_SECONDS):
                        crowded = oversubscribed(torch.get_num_threads(), watch)
                        if crowded:
                            log.warning("%s", crowded)
                            watch = None
            if do_validate or do_save:
                with clock.paused():  # validation and checkpoints do not count as training time
                    run.train_seconds = clock.seconds
                    end_sitting_here()  # (validation may write best.pt)
                    if do_validate:
                        scores = validate(writer)
                        log.info("iteration %d (%.0f s of training, %.2f ms/iteration) validation %s", at,
                                 run.train_seconds, (clock.seconds - start_seconds) / (at - start_iteration) * 1e3,
                                 " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
                    if do_save:
                        save()
                        last_good = at
            if out_of_time:
                clock.log_stop(at, run.run_dir)
                break
    bar.close()
    if writer is not None:
        writer.close()
    if stop.now():  # (otherwise the last iteration saved, with the clock read)
        run.train_seconds = clock.read()
        if first_bad.item() < 0:
            end_sitting_here()
            path = save()
            if path is not None:
                log.info("%s received: saved %s at iteration %d", stop.now(), path, run.iteration)
            stop.hand_on()  # a scheduler's SIGUSR2: its handler requeues the job (and exits)
        raise KeyboardInterrupt(stop.now())
