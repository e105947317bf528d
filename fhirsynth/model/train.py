"""Patient-level DP training (the only module that imports opacus).

Privacy accounting, end to end (privacy unit = one patient, add/remove-one adjacency):
  * randomness: by default every DP release draws secret noise: the statistics through dpnoise.NoiseSource (OpenDP,
    OS CSPRNG), DP-SGD's Poisson sampling and Gaussian noise through securerng (os.urandom). `seed` fixes only
    what is not private (weight initialisation). reproducible_noise=True (tests / research) draws all of it from
    `seed` instead, and privacy.json then says there is no guarantee.
  * no exact patient count leaves the process: the sex marginal (a DP release) is made first and the sum of its
    noisy counts, n_estimate, is what delta, the sampling rate, the step count and the warm-up derive from;
    Opacus' own rate and expected batch (functions of the exact n) are overridden with those, and the accountant
    is given exactly the rate the sampler draws with, once per optimizer step the loop takes.
  * budget split, in zCDP rho (composition.py): the target (epsilon, delta) is a budget rho_total; the DP
    vocabulary (vocab.py) is calibrated at vocab_epsilon_fraction of it, the statistics that generate calibrates
    to (measurements.py, 0 = none) at measure_epsilon_fraction of it (epsilon_preprocessing and
    epsilon_measurements are what each would be alone), the sex marginal (released first, before delta is known)
    at its share of the vocabulary's epsilon. Bin edges, length limits, the token grammar and the reference date
    are public settings and cost nothing.
  * DP-SGD: Opacus, one patient = one sequence = one example, Poisson sampling with rate 1/steps_per_epoch,
    per-example clipping to max_grad_norm, Gaussian noise. The noise multiplier is the smallest whose RDP,
    composed with the actual releases before it, stays at or under the target (composition.sgd_noise_multiplier).
  * composition: Renyi DP over every release (composition.compose): epsilon_total is Opacus' conversion of the
    summed RDP curves at delta minus the thresholds' deltas; recomputed from the accountant's history after
    training and checked against the target.
  * the training loss is computed on private data and is NOT a DP release: with DP it is shown on the console
    only and the training curve in the model dir holds step / epoch / epsilon spent.
  * resumable state lives in a work directory BESIDE the model dir (or --work-dir), never inside it; it is removed
    when training finishes or aborts with an error, and kept only after an interruption, to resume.
--no-dp: same model and loop without clipping/noise, vocabulary from exact counts; epsilon = infinity
(JSON null, "dp": false).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fhirsynth.errors import FhirsynthError, InputError, PrivacyBudgetError, UsageError
from fhirsynth.logs import progress
from fhirsynth.model import checkpoint as ck
from fhirsynth.model.config import (
    DEFAULT_EPOCHS,
    MIN_DP_STEPS,
    default_entry_weight,
    default_lr,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    to_json,
    versions,
)
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.measurements import MEASUREMENTS
from fhirsynth.model.vocab import (
    Vocab,
    build_vocab,
    release_sex_shares,
    sex_epsilon,
)
from fhirsynth.testpoint import pause_point
from fhirsynth.timeline.io import read_timelines

log = logging.getLogger(__name__)


class SeqDataset(Dataset):
    """One item per patient: a [L, 2] long tensor of (token id, age id) pairs."""

    def __init__(self, seqs: list[tuple[list[int], list[int]]]) -> None:
        self.seqs = [torch.tensor(list(zip(toks, ages)), dtype=torch.long) for toks, ages in seqs]

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.seqs[i]


def pad_collate(batch: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad items [L] or [L, 2] to the longest of the batch (PAD = 0, age id 0 there: the loss ignores
    PAD targets); shape [0, 2, 2] (the training pairs' shape) for an empty Poisson batch."""
    if not batch:
        return torch.zeros((0, 2, 2), dtype=torch.long)
    L = max(len(s) for s in batch)
    out = torch.zeros((len(batch), L, *batch[0].shape[1:]), dtype=torch.long)
    for i, s in enumerate(batch):
        out[i, : len(s)] = s
    return out


def _quiet_opacus() -> None:
    """Opacus warnings that are expected here: its own secure mode (torchcsprng) stays off because securerng.py
    draws the noise and sampling from os.urandom by default (--reproducible-noise warns on its own), and the
    accounting is checked here."""
    for msg in ("Optimal order is the", "Secure RNG turned off", "Full backward hook is firing",
                "Using a non-full backward hook"):
        warnings.filterwarnings("ignore", message=msg)


MAX_EPSILON = 100.0


def default_delta(n: int) -> float:
    return min(1e-5, n ** -1.1)


def _validate(tc: TrainConfig) -> None:
    problems = []
    if tc.dp:
        if tc.epsilon is None or not math.isfinite(tc.epsilon) or tc.epsilon <= 0:
            raise PrivacyBudgetError(f"must be a positive finite number (got {tc.epsilon})",
                                     where="--epsilon")
        if tc.epsilon > MAX_EPSILON:
            # Beyond this the guarantee is vacuous and the accountants' noise search degenerates (sigma -> 0).
            raise PrivacyBudgetError(f"epsilon {tc.epsilon:g} is above {MAX_EPSILON:g} and gives no meaningful "
                                     "guarantee; use --no-dp for a non-private comparison model", where="--epsilon")
        if tc.delta is not None and not 0 < tc.delta < 1:
            raise PrivacyBudgetError(f"must be in (0, 1) or auto (got {tc.delta})", where="--delta")
        if not 0 < tc.vocab_epsilon_fraction < 1 or not 0 < tc.vocab_delta_fraction < 1:
            raise PrivacyBudgetError("vocabulary budget fractions must be in (0, 1)")
        if not 0 <= tc.measure_epsilon_fraction < 1 or not 0 <= tc.measure_delta_fraction < 1 \
                or (tc.measure_epsilon_fraction > 0) != (tc.measure_delta_fraction > 0):
            raise PrivacyBudgetError(f"must be in [0, 1) (got {tc.measure_epsilon_fraction})",
                                     where="--measure-epsilon-fraction")
        if tc.vocab_epsilon_fraction + tc.measure_epsilon_fraction >= 0.95 \
                or tc.vocab_delta_fraction + tc.measure_delta_fraction >= 0.95:
            raise PrivacyBudgetError("the vocabulary and measurement shares leave (almost) nothing for training",
                                     where="--measure-epsilon-fraction")
        if not tc.max_grad_norm > 0:
            raise PrivacyBudgetError(f"must be > 0 (got {tc.max_grad_norm})", where="--max-grad-norm")
    if not 0 <= tc.measure_epsilon_fraction < 1:
        problems.append(f"--measure-epsilon-fraction must be in [0, 1) (got {tc.measure_epsilon_fraction})")
    if tc.epochs is not None and tc.epochs < 1:
        problems.append(f"--epochs must be >= 1 (got {tc.epochs})")
    if tc.batch_size < 1:
        problems.append(f"--batch-size must be >= 1 (got {tc.batch_size})")
    if tc.max_physical_batch < 1:
        problems.append(f"--max-physical-batch must be >= 1 (got {tc.max_physical_batch})")
    if not tc.lr > 0:
        problems.append(f"learning rate must be > 0 (got {tc.lr})")
    if not 0 <= tc.entry_weight <= 1:
        problems.append(f"entry weight must be in [0, 1] (got {tc.entry_weight})")
    if not 0 <= tc.warmup_frac < 1:
        problems.append(f"warmup fraction must be in [0, 1) (got {tc.warmup_frac})")
    if problems:
        raise UsageError("; ".join(problems))


def _signature(tc: TrainConfig, mc: ModelConfig, tk: TokenizerConfig, n: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (otherwise the accounting would not add up). It lives in the
    work directory only (never published)."""
    t = to_json(tc)
    t.pop("checkpoint_every", None)
    # the model format too: a checkpoint of another format's network cannot be continued
    return {"train": t, "model": to_json(mc), "tokenizer": to_json(tk), "n": n, **versions()}


def default_work_dir(out: Path) -> Path:
    """Where the resumable state of a run writing `out` lives: a hidden sibling, never inside the model dir."""
    out = out.resolve()
    return out.parent / f".{out.name}.fhirsynth-train"


def default_epochs(steps_per_epoch: int, dp: bool) -> int:
    """The epochs when none are given: DEFAULT_EPOCHS, and under DP enough for MIN_DP_STEPS optimizer steps (a small
    cohort makes few steps per epoch; config.py says what was measured). From the DP patient count, never n."""
    if not dp:
        return DEFAULT_EPOCHS
    return max(DEFAULT_EPOCHS, math.ceil(MIN_DP_STEPS / steps_per_epoch))


def steps_per_epoch_for(n_estimate: int, batch_size: int) -> int:
    """Poisson steps per epoch at expected batch `batch_size`, from the DP estimate of n (never the exact n)."""
    return max(1, math.ceil(n_estimate / batch_size))


def epsilons(history: list, delta: float) -> tuple[float, float]:
    """(epsilon_prv, epsilon_rdp) of an Opacus accountant history at delta."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if not history:
        return 0.0, 0.0
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = list(history)
    rdp.history = list(history)
    return float(prv.get_epsilon(delta)), float(rdp.get_epsilon(delta))


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def train_model(
    timelines_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    epsilon: float | None = 8.0,
    delta: float | None = None,
    dp: bool = True,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 1,
    batch_size: int = 64,
    max_physical_batch: int = 32,
    max_grad_norm: float = 1.0,
    lr: float | None = None,
    entry_weight: float | None = None,
    warmup_frac: float = TrainConfig.warmup_frac,
    reproducible_noise: bool = False,
    work_dir: str | os.PathLike | None = None,
    vocab_epsilon_fraction: float = TrainConfig.vocab_epsilon_fraction,
    measure_epsilon_fraction: float = TrainConfig.measure_epsilon_fraction,
    checkpoint_every: int = 50,
    model_config: ModelConfig | None = None,
    tokenizer_config: TokenizerConfig | None = None,
    on_step: Callable[[int], None] | None = None,
    distributed: bool | None = None,
    init: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train a model dir from a timelines dir; returns the privacy report (privacy.json).

    Rerunning with the same arguments after an interruption resumes from the work directory (default: a hidden
    sibling of MODEL_DIR, see default_work_dir). reproducible_noise: research / tests only (no guarantee).
    on_step(step) is called after every optimizer step (tests use it to simulate a kill).
    entry_weight: None = default_entry_weight (0.2 under DP, 1 without).
    epochs: None = default_epochs (10, or more under DP for a cohort too small to make MIN_DP_STEPS steps in 10).
    distributed: one process of a torchrun job (None = when env WORLD_SIZE > 1); see model/distributed.py.
    init: a public prior model dir (prior.py): its vocabulary joins this one's, its weights initialise the
    network, whose sizes are then the prior's (a model_config with other sizes is refused). No budget is spent on it.
    """
    if lr is None:
        lr = default_lr(model_config.arch if model_config else ModelConfig.arch, dp)
    if entry_weight is None:
        entry_weight = default_entry_weight(dp)
    tc = TrainConfig(epsilon=epsilon if dp else None, delta=delta, dp=dp, epochs=epochs, batch_size=batch_size,
                     max_physical_batch=max_physical_batch, max_grad_norm=max_grad_norm, lr=lr, seed=seed,
                     warmup_frac=warmup_frac, entry_weight=entry_weight,
                     reproducible_noise=reproducible_noise, vocab_epsilon_fraction=vocab_epsilon_fraction,
                     measure_epsilon_fraction=measure_epsilon_fraction,
                     measure_delta_fraction=TrainConfig.measure_delta_fraction if measure_epsilon_fraction > 0
                     else 0.0, checkpoint_every=checkpoint_every)
    _validate(tc)
    _quiet_opacus()
    tdir, out = Path(timelines_dir), Path(out_dir)
    if not tdir.is_dir():
        raise UsageError("timelines directory not found", where=str(tdir))
    dev = ck.resolve_device(device)
    # copies: training fills in sizes, and a caller's config reused for a resume must not carry them
    tk = dataclasses.replace(tokenizer_config) if tokenizer_config else TokenizerConfig()
    mc = dataclasses.replace(model_config) if model_config else ModelConfig()
    prior = None
    if init is not None:
        from fhirsynth.model.prior import load_prior, network_config

        prior = load_prior(init, tk, mc, explicit_shape=model_config is not None)
        mc = network_config(prior, mc)
        tc.init, tc.init_model_hash = str(Path(init).resolve()), prior.model_hash
    mc.max_len = tk.max_len
    from fhirsynth.model import distributed as dd

    if distributed is None:
        distributed = dd.requested_by_env()
    if distributed and not dp:
        raise UsageError("distributed training is implemented for DP training only", where="--no-dp")
    dctx = dd.setup(dev) if distributed else None
    if dctx is not None:
        dev = dctx.device
    main = dctx is None or dctx.is_main  # only this process writes files
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise UsageError("the work directory must not be inside the model directory (it holds private state)",
                         where="--work-dir")
    ok = False
    owner: list[bool] = [False]  # set once this run has claimed the work dir (a new one, or its own checkpoint)
    try:
        privacy = _train(tc, tdir, out, work, dev, tk, mc, delta, dp, seed, on_step, dctx, main, owner, prior)
        ok = True
        return privacy
    except FhirsynthError:
        # an abort (bad input, budget, accounting): nothing to resume, and the state is private. A checkpoint
        # of another run (refused above) is left alone.
        if main and owner[0]:
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        if main and work.exists():
            log.warning("training interrupted: resumable private state kept in %s (rerun the same command to "
                        "resume; never publish that directory)", work)
        raise
    finally:
        if dctx is not None:
            dd.teardown(dctx, wait=ok)  # no barrier after a failure: the other ranks may be stuck mid-collective


def _train(tc, tdir, out, work, dev, tk, mc, delta, dp, seed, on_step, dctx, main, owner, prior=None
           ) -> dict[str, Any]:
    from fhirsynth.model import distributed as dd

    timelines = list(read_timelines(tdir))
    if not timelines:
        raise InputError("no patients in the timelines directory (empty events/patients parquet)", where=str(tdir))
    noise = NoiseSource.reproducible(seed) if tc.reproducible_noise else NoiseSource.secure_source()
    if dp and tc.reproducible_noise and main:
        log.warning("--reproducible-noise: the DP noise is replayable from seed %d, so this model has NO privacy "
                    "guarantee (tests and research only; privacy.json says so)", seed)
    meas_doc: dict[str, Any] | None = None
    meas_report: dict[str, Any] | None = None

    state_path = work / ck.CHECKPOINT_STATE
    resume: dict[str, Any] | None = None
    sig_probe = _signature(tc, mc, tk, len(timelines))  # tc.delta is still the user's (None = auto) here
    if state_path.is_file():
        try:
            resume = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"checkpoint is unreadable ({exc}); delete it to start over", where=str(work)) from None
        if resume.get("signature") != sig_probe:
            raise UsageError("a checkpoint of a run with different settings or data exists; rerun with the same "
                             "arguments to resume, or delete it to start over", where=str(work))
        owner[0] = True
        vocab = Vocab.from_json(tk, ck._read_json(work / ck.VOCAB))
        vocab_report = resume["vocab_report"]
        if (work / MEASUREMENTS).is_file():
            saved = ck._read_json(work / MEASUREMENTS)
            meas_doc, meas_report = saved["doc"], saved["report"]
        tc.delta = float(resume["delta"])
        log.info("resuming from step %d of %d", resume["step"], resume["total_steps"])
    else:
        # The DP releases before training, made once (rank 0) with secret noise; a resumed run reuses them.
        # The sex marginal comes first: its noisy total is the DP patient count that delta derives from.
        owner[0] = True
        if main:
            vocab, vocab_report, eps_meas = release_vocabulary(tc, timelines, tk, noise, delta, prior)
            work.mkdir(parents=True, exist_ok=True)
            ck.atomic_write_json(work / ck.VOCAB, vocab.to_json())
            meas_doc, meas_report = _measure(tc, timelines, vocab, noise, eps_meas)
            if meas_doc is not None:
                ck.atomic_write_json(work / MEASUREMENTS, {"doc": meas_doc, "report": meas_report})
        if dctx is not None:  # one DP release on rank 0, the same vocabulary everywhere
            # the measurements' report too: every rank composes the same releases into the same noise multiplier
            vj, vocab_report, meas_report, tc.delta = dd.broadcast(
                (vocab.to_json(), vocab_report, meas_report, tc.delta) if main else None, dctx)
            vocab = Vocab.from_json(tk, vj)
    n_estimate = int(vocab_report["sex_marginal"]["n_estimate"])
    releases: list = []
    d_conv = None
    if dp:
        from fhirsynth.model import composition

        releases = composition.releases_of(vocab_report, meas_report)
        d_conv = composition.conversion_delta(releases, tc.delta)
        released_rdp = composition.released_rdp(releases)

    from fhirsynth.model.archs import build_arch

    stats: Counter = Counter()
    torch.manual_seed(seed)
    arch = build_arch(mc, vocab, timelines, stats, entry_weight=tc.entry_weight)
    del timelines
    for k, v in sorted(stats.items()):
        log.debug("encoder: %s = %d", k, v)  # exact counts: the operator's console only, at debug level
    if not len(arch.dataset):
        raise InputError("no patient could be encoded (all lack a birth date)", where=str(tdir))
    if prior is not None and resume is None:  # (a resumed run's weights come from its checkpoint)
        from fhirsynth.model.prior import transfer

        vocab_report["prior"] = prior.report(transfer(arch.model, vocab, prior))
    model = arch.model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ds = arch.dataset
    # every size-dependent setting comes from the DP estimate (under --no-dp it is the exact count)
    steps_per_epoch = steps_per_epoch_for(n_estimate, tc.batch_size)
    if tc.epochs is None:  # after the signature: a resumed run resolves it again from the same saved n_estimate
        tc.epochs = default_epochs(steps_per_epoch, dp)
    total_steps = tc.epochs * steps_per_epoch
    q = 1.0 / steps_per_epoch
    step = 0
    curve: list[dict[str, Any]] = []
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as exc:  # a network of other code (same settings): it cannot be continued
            why = str(exc).splitlines()[-1].strip()
            raise UsageError(f"the checkpoint holds a network this fhirsynth does not build ({why}); delete it to "
                             "start over", where=str(work)) from None
        opt.load_state_dict(resume["optimizer"])
        step = int(resume["step"])
        curve = list(resume["curve"])

    sigma = 0.0
    engine = None
    if dp:
        from opacus import PrivacyEngine

        sigma = (composition.sgd_noise_multiplier(tc.epsilon, d_conv, q, total_steps, released_rdp)
                 if resume is None else float(resume["sigma"]))
        # secure_mode stays off in Opacus (it needs torchcsprng); securerng does its job (see make_private)
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        model, opt, loader = make_private(engine, model, opt, ds, q=q, n_estimate=n_estimate, sigma=sigma,
                                          max_grad_norm=tc.max_grad_norm, batch_size=tc.batch_size,
                                          secure=not tc.reproducible_noise, seed=seed, dctx=dctx,
                                          collate=arch.collate)
        if resume is not None:
            engine.accountant.load_state_dict(resume["accountant"])
    pending_rng = None
    if resume is not None and (not dp or tc.reproducible_noise):
        pending_rng = resume["rng"]  # restored where the uninterrupted run would be (see the loop)
    elif resume is None:
        torch.manual_seed(seed + 1)

    base_model = dd.unwrap(model._module) if dp else model
    # CUDA: bf16 autocast for --no-dp; DP keeps fp32 parameters/activations for Opacus' per-sample gradient
    # hooks (untested in bf16 here) and gets TF32 matmuls instead, which are transparent to Opacus.
    use_amp = dev.type == "cuda" and not dp
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def history() -> list:
        return list(engine.accountant.history) if engine is not None else []

    def save_checkpoint() -> None:
        state = {
            "signature": sig_probe, "step": step, "total_steps": total_steps, "sigma": sigma,
            "model": base_model.state_dict(), "optimizer": opt.state_dict(),
            "accountant": engine.accountant.state_dict() if engine is not None else {},
            "rng": _rng_state(), "curve": curve, "vocab_report": vocab_report, "delta": tc.delta,
        }
        if main:
            ck.atomic_torch_save(state_path, state)

    bar = progress(total=total_steps, initial=step, desc="train", unit="step", **({} if main else {"disable": True}))
    model.train()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            remaining = steps_per_epoch - step % steps_per_epoch
            if dp:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                loader.batch_sampler.steps = remaining
                if dctx is not None:
                    loader.batch_sampler.begin(step)
                ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=tc.max_physical_batch,
                                         optimizer=opt)
            else:
                ctx = _PlainBatches(ds, tc.batch_size, tc.max_physical_batch, seed, epoch,
                                    skip=steps_per_epoch - remaining, collate=arch.collate)
            with ctx as batches:
                acc_loss, acc_n = 0.0, 0
                # Creating a DataLoader iterator draws a seed from the global RNG. An uninterrupted run does
                # that at epoch starts only, so a resumed run restores its RNG before the iterator at an epoch
                # boundary and after it mid-epoch: the Poisson batches and noise then continue identically.
                if pending_rng is not None and remaining == steps_per_epoch:
                    _set_rng_state(pending_rng)
                    pending_rng = None
                it = iter(batches)
                if pending_rng is not None:
                    _set_rng_state(pending_rng)
                    pending_rng = None
                for batch in it:
                    for group in opt.param_groups:  # a function of the step only: resuming needs no state
                        group["lr"] = lr_at(tc, step, total_steps)
                    batch = arch.to_device(batch, dev)
                    nb = arch.batch_size_of(batch)
                    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                        per_seq, n_units = arch.loss(model, batch)
                    if nb > 0:
                        loss = per_seq.mean()
                        acc_loss += float(per_seq.detach().sum()) * arch.norm  # the curve: NLL per token / visit
                        acc_n += n_units
                    else:  # empty Poisson batch: still a DP step (noise only), zero-size grad samples
                        loss = per_seq.sum()
                    if not dp and nb > 0:
                        loss = loss * (nb / max(batches.logical_size, 1))
                    loss.backward()
                    stepped = _step(opt, dp, batches)
                    if not stepped:
                        continue
                    step += 1
                    eps_now = None
                    if dp and (step % 10 == 0 or step % steps_per_epoch == 0 or step == total_steps):
                        # everything released so far: the releases before training and these steps
                        eps_now = composition.epsilon_of(released_rdp + composition.sgd_rdp(history()), d_conv)
                    mean_loss = acc_loss / acc_n if acc_n else None
                    row = {"step": step, "epoch": step / steps_per_epoch, "epsilon": eps_now if dp else None}
                    if not dp:  # the DP loss is private: console only, not even in the (private) work dir
                        row["loss"] = mean_loss
                    curve.append(row)
                    acc_loss, acc_n = 0.0, 0
                    bar.update(1)
                    post = {"loss": f"{mean_loss:.3f}" if mean_loss is not None else "-"}
                    if eps_now is not None:
                        post["eps"] = f"{eps_now:.2f}"
                    bar.set_postfix(post)
                    if step % tc.checkpoint_every == 0 or step % steps_per_epoch == 0:
                        save_checkpoint()
                        pause_point("train-after-checkpoint")
                    if step % steps_per_epoch == 0:
                        log.info("epoch %d/%d: step %d, loss %s%s", step // steps_per_epoch, tc.epochs, step,
                                 post["loss"], f", epsilon (RDP) {eps_now:.3f}" if eps_now is not None else "")
                    if on_step is not None:
                        on_step(step)
                    if step >= total_steps:
                        break
    finally:
        bar.close()

    eps_prv = eps_rdp = None
    composed = None
    if dp:
        eps_prv, eps_rdp = epsilons(history(), d_conv)
        composed = composition.compose(releases, history(), tc.delta)
        if composed["epsilon"] > tc.epsilon * (1 + 1e-6):
            raise PrivacyBudgetError(f"spent epsilon {composed['epsilon']:.4f} exceeds the target {tc.epsilon:g} "
                                     "(accounting bug)")
    if dp and accounted_steps(history()) != total_steps:
        raise PrivacyBudgetError(f"the accountant recorded {accounted_steps(history())} steps where the loop took "
                                 f"{total_steps} (accounting bug)")
    privacy = _privacy_report(tc, n_estimate, sigma, q, total_steps, eps_prv, eps_rdp, vocab_report, meas_report,
                              composed)
    privacy["world_size"] = dctx.world_size if dctx is not None else 1
    if "prior" in vocab_report:
        privacy["prior"] = vocab_report["prior"]
        privacy["vocabulary"] = {k: v for k, v in privacy["vocabulary"].items() if k != "prior"}
    if not main:
        return privacy
    config = {**versions(), "model": to_json(mc), "tokenizer": to_json(tk), "training": to_json(tc)}
    if dp:  # the loss is private (not covered by DP-SGD): never in the released curve
        curve_out = [{"step": r["step"], "epoch": round(r["epoch"], 4), "epsilon": r["epsilon"]} for r in curve]
    else:
        curve_out = [{"step": r["step"], "epoch": round(r["epoch"], 4), "loss": r.get("loss")} for r in curve]
    ck.write_model_dir(out, state_dict=base_model.state_dict(), config=config, vocab=vocab.to_json(),
                       privacy=privacy, curve=curve_out, extra={MEASUREMENTS: meas_doc} if meas_doc else None)
    shutil.rmtree(work, ignore_errors=True)
    log.info("model written to %s (epsilon_total=%s)", out, privacy["epsilon_total"])
    return privacy


def as_batch(batch) -> torch.Tensor:
    """A loader item as the [B, L, 2] training tensor. Opacus' collate wrapper yields a list of zero-size tensors for
    an empty Poisson batch drawn before any non-empty one; it is a noise-only step like any other empty batch."""
    if isinstance(batch, torch.Tensor):
        return batch
    return torch.zeros((0, 2, 2), dtype=torch.long)


def lr_at(tc: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_frac of the steps, then
    constant. Without it, the default model sat on a loss plateau near the unigram entropy for 2-5 of 16
    epochs on the US cohort (format 4) before it learned the grammar."""
    warmup = math.ceil(tc.warmup_frac * total_steps)
    return tc.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else tc.lr


def _step(opt, dp: bool, batches) -> bool:
    """Optimizer step; True when a logical (noised) step happened, False for a skipped physical batch."""
    if dp:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return not opt._is_last_step_skipped
    if batches.last_of_logical:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True
    return False


class _PlainBatches:
    """Non-DP batches: a seeded shuffle per epoch, split into physical batches like BatchMemoryManager."""

    def __init__(self, ds, batch_size: int, physical: int, seed: int, epoch: int, skip: int,
                 collate=None) -> None:
        self.collate = collate or pad_collate
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(len(ds), generator=g).tolist()
        self.logical = [perm[i: i + batch_size] for i in range(0, len(perm), batch_size)][skip:]
        self.ds, self.physical = ds, physical
        self.logical_size = 0
        self.last_of_logical = False

    def __enter__(self) -> _PlainBatches:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self):
        for idx in self.logical:
            self.logical_size = len(idx)
            chunks = [idx[i: i + self.physical] for i in range(0, len(idx), self.physical)]
            for j, chunk in enumerate(chunks):
                self.last_of_logical = j == len(chunks) - 1
                yield self.collate([self.ds[i] for i in chunk])


def accounted_steps(history: list) -> int:
    """Steps in an Opacus accountant history ((sigma, q, steps) entries; Opacus merges equal neighbours)."""
    return int(sum(h[2] for h in history))


def make_private(engine, model, opt, ds, *, q: float, n_estimate: int, sigma: float,
                 max_grad_norm: float, batch_size: int, secure: bool, seed: int, dctx, collate=None) -> tuple:
    """Opacus make_private with the sampling rate, the expected batch and the accountant's rate all set to the
    ones this run uses: q (from the DP estimate of n) everywhere. Opacus alone would derive the rate from the
    exact dataset size (1 / len(loader), and its sampler's steps as int(1 / q), which can differ from the loop's
    count) and scale gradients by an expected batch computed from the exact n.
    secure: Poisson sampling and Gaussian noise from the OS CSPRNG (securerng.py)."""
    from fhirsynth.model import distributed as dd
    from fhirsynth.model import securerng

    collate = collate or pad_collate
    if dctx is None:
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    else:
        model = dd.wrap_model(model)
        loader = dd.make_loader(ds, round(1 / q), seed, dctx, collate, secure=secure)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=max_grad_norm, poisson_sampling=dctx is None,
    )
    world = dctx.world_size if dctx is not None else 1
    loader.batch_sampler.sample_rate = q
    loader.batch_sampler.steps = round(1 / q)
    loader.sample_rate = q
    opt.expected_batch_size = max(q * n_estimate, 1.0) / world  # per worker, as Opacus divides it
    opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
    if secure:
        securerng.install_noise(opt)
        if dctx is None:
            securerng.install_sampling(loader)
    return model, opt, loader


def release_vocabulary(tc: TrainConfig, timelines: list, tk: TokenizerConfig, noise: NoiseSource,
                       delta: float | None, prior=None) -> tuple[Vocab, dict[str, Any], float | None]:
    """The DP releases before the measurements, in train's order: the sex marginal (whose noisy total sets
    tc.delta when delta is None), then the vocabulary at its share of the budget. Returns (vocab, its report, the
    measurements' epsilon: _budget_split, None without DP). benchmarks/bench_measure.py repeats them."""
    dp = tc.dp
    eps_sex = sex_epsilon(tc.epsilon * tc.vocab_epsilon_fraction) if dp else None
    sex_release = release_sex_shares(timelines, dp=dp, epsilon=eps_sex, noise=noise)
    tc.delta = delta if delta is not None else default_delta(sex_release[1]["n_estimate"])
    eps_vocab = eps_meas = None
    if dp:
        eps_vocab, eps_meas = _budget_split(tc)
    vocab, vocab_report = build_vocab(timelines, tk, dp=dp, epsilon=eps_vocab,
                                      delta=tc.delta * tc.vocab_delta_fraction if dp else None, noise=noise,
                                      sex_release=sex_release, prior=prior)
    return vocab, vocab_report, eps_meas


def _budget_split(tc: TrainConfig) -> tuple[float, float | None]:
    """(epsilon_preprocessing, epsilon_measurements): the (epsilon at their deltas) that give the vocabulary and the
    measurements their shares of the zCDP budget of (epsilon, delta); the measurements' is None at share 0. The
    budget is converted at delta minus the vocabulary's delta (its thresholds take at most that much)."""
    from fhirsynth.model.composition import nominal_epsilon, rho_budget

    assert tc.epsilon is not None and tc.delta is not None
    rho = rho_budget(tc.epsilon, tc.delta * (1 - tc.vocab_delta_fraction))
    eps_vocab = nominal_epsilon(rho * tc.vocab_epsilon_fraction, tc.delta * tc.vocab_delta_fraction)
    eps_meas = (nominal_epsilon(rho * tc.measure_epsilon_fraction, tc.delta * tc.measure_delta_fraction)
                if tc.measure_epsilon_fraction > 0 else None)
    return eps_vocab, eps_meas


def _measure(tc: TrainConfig, timelines: list, vocab: Vocab, noise: NoiseSource,
             eps: float | None) -> tuple[dict | None, dict | None]:
    """The calibration statistics (measurements.py) at eps (_budget_split); (None, None) when the share is 0.
    Made once, right after the vocabulary (their codes are the vocabulary's)."""
    if tc.measure_epsilon_fraction <= 0:
        return None, None
    from fhirsynth.model.measurements import measure

    delta = tc.delta * tc.measure_delta_fraction if tc.dp else None
    return measure(timelines, vocab, dp=tc.dp, epsilon=eps, delta=delta, noise=noise)


def _privacy_report(tc: TrainConfig, n_estimate: int, sigma: float, q: float, steps: int, eps_prv, eps_rdp,
                    vocab_report: dict, meas_report: dict | None = None, composed: dict | None = None
                    ) -> dict[str, Any]:
    sizes = ("sample_rate, steps, warm-up and delta (auto) derive from n_estimate, the sum of the DP sex "
             "histogram's noisy counts (vocabulary.sex_marginal); the exact patient count is not released")
    if not tc.dp:
        return {
            "unit": "patient", "dp": False, "n_estimate": n_estimate, "epsilon_target": None,
            "epsilon_prv": None, "epsilon_rdp": None, "epsilon_training": None, "epsilon_preprocessing": None,
            "epsilon_total": None, "guarantee": "none: trained without differential privacy",
            "epsilon_note": "no differential privacy: epsilon = infinity (JSON null)",
            "delta": None, "noise_multiplier": 0.0, "sample_rate": q, "steps": steps, "epochs": tc.epochs,
            "batch_size": tc.batch_size, "max_grad_norm": None,
            "vocabulary": {**vocab_report, "note": "vocabulary from exact counts (not private)"},
            "measurements": meas_report,
        }
    assert composed is not None
    if tc.reproducible_noise:
        guarantee = ("NONE: noise reproducible from a stored seed (--reproducible-noise, for tests and research); "
                     "the epsilon below holds only against an adversary who cannot replay the seed")
        source = f"seeded PRNG (seed {tc.seed}, written to config.json): reproducible"
    else:
        guarantee = "(epsilon_total, delta)-DP for each patient, add/remove-one adjacency"
        source = ("secret: DP-SGD Poisson sampling and Gaussian noise from os.urandom (securerng); the released "
                  "counts from OpenDP's discrete Laplace / discrete Gaussian (OS CSPRNG); no noise seed exists")
    return {
        "unit": "patient", "dp": True, "guarantee": guarantee,
        "adjacency": "add/remove one patient (all of their resources)",
        "noise_source": source,
        "n_estimate": n_estimate, "sizes": sizes,
        "epsilon_target": tc.epsilon,
        "epsilon_prv": eps_prv, "epsilon_rdp": eps_rdp, "epsilon_training": max(eps_prv, eps_rdp),
        "epsilon_preprocessing": vocab_report["epsilon_total"],
        "epsilon_measurements": meas_report["epsilon"] if meas_report else 0.0,
        "epsilon_total": composed["epsilon"],
        "delta": tc.delta, "delta_conversion": composed["delta_conversion"],
        "delta_thresholds": composed["delta_thresholds"],
        "delta_preprocessing": vocab_report["delta_total"],
        "delta_measurements": meas_report["delta"] if meas_report else 0.0,
        "composition": "Renyi DP (fhirsynth/model/composition.py): the RDP curves of every release add up order "
                       "by order (discrete Gaussian rho-zCDP: a * rho; discrete Laplace at epsilon: "
                       "min(epsilon, a epsilon^2 / 2); DP-SGD: Opacus compute_rdp over the accountant's history); "
                       "epsilon_total is Opacus' get_privacy_spent of the sum at delta_conversion = delta - "
                       "delta_thresholds (the set-union thresholds' failure probabilities). epsilon_preprocessing, "
                       "epsilon_measurements and epsilon_training (max of Opacus' PRV and RDP accountants at "
                       "delta_conversion) are each part alone, for reference: they do not add up to the total",
        "rho": composed["rho"],
        "budget_shares": {"preprocessing": tc.vocab_epsilon_fraction, "measurements": tc.measure_epsilon_fraction,
                          "unit": "shares of the zCDP rho of (epsilon_target, delta); DP-SGD fills the rest"},
        "mechanisms": {
            "training": "DP-SGD (Opacus): Poisson sampling at sample_rate, per-patient clipping to max_grad_norm, "
                        "Gaussian noise noise_multiplier * max_grad_norm; epsilon from Opacus' PRV and RDP "
                        "accountants over `steps` steps",
            "preprocessing": "vocabulary: " + str(vocab_report.get("mechanism")) + "; sex marginal, deaths per "
                             "birth band: discrete Laplace; value bins: discrete Gaussian (see vocabulary)",
            "measurements": "calibration statistics (measurements.json): discrete Gaussian per family, zCDP "
                            "composition (see measurements)" if meas_report else "none (measurement share 0)",
        },
        "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "epochs": tc.epochs,
        "batch_size": tc.batch_size, "max_grad_norm": tc.max_grad_norm, "poisson_sampling": True,
        "reproducible_noise": tc.reproducible_noise,
        "accountants": "noise multiplier = the smallest whose DP-SGD RDP (Opacus), composed with the releases "
                       "before training, converts to at most epsilon_target (composition.sgd_noise_multiplier)",
        "vocabulary": vocab_report,
        "measurements": meas_report,
        "public_settings": "bin edges (mappings/reference-ranges.toml), time buckets, max_len, grammar, "
                           "reference date: public, no budget",
        "not_released": "training loss (private, console only); the exact patient count",
    }
