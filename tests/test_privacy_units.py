"""The privacy path's parts one by one, each against a value computed here independently (a closed-form tail bound,
the noise's known variance, Opacus' accountants called directly), so that a mutant that weakens the noise, miscounts
the budget or under-reports epsilon fails a test. Fast on purpose: the mutation runner reruns these per mutant."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date

import numpy as np
import pytest

from fhirsynth.errors import PrivacyBudgetError, UsageError
from fhirsynth.model.dpnoise import NoiseSource, gaussian_epsilon, gaussian_sigma, set_union_threshold
from fhirsynth.model.train import (
    MAX_EPSILON,
    _privacy_report,
    _validate,
    accounted_steps,
    default_delta,
    epsilons,
    steps_per_epoch_for,
)
from fhirsynth.model import composition
from fhirsynth.model.vocab import SEXES, release_sex_shares, split_preprocessing
from fhirsynth.timeline.types import PatientInfo, Timeline

# ---------------------------------------------------------------- dpnoise: the calibration


@pytest.mark.parametrize("eps,delta,sens", [(1.0, 1e-6, 1.0), (0.3, 1e-5, math.sqrt(8)), (4.0, 1e-7, 2.0)])
def test_gaussian_sigma_is_the_smallest_scale_that_meets_epsilon(eps, delta, sens):
    sigma = gaussian_sigma(eps, delta, sens)
    assert gaussian_epsilon(sigma, delta, sens) <= eps * (1 + 1e-6)
    assert gaussian_epsilon(sigma * 0.97, delta, sens) > eps  # not needlessly noisy
    # against the textbook bound: rho = sens^2 / (2 sigma^2) zCDP gives eps <= rho + 2 sqrt(rho ln(1/delta))
    rho = sens ** 2 / (2 * sigma ** 2)
    assert eps <= rho + 2 * math.sqrt(rho * math.log(1 / delta)) * (1 + 1e-9)
    # sensitivity scales the noise linearly
    assert gaussian_sigma(eps, delta, 2 * sens) == pytest.approx(2 * sigma, rel=0.02)


@pytest.mark.parametrize("eps,delta", [(0.0, 1e-6), (-1.0, 1e-6), (1.0, 0.0), (1.0, 1.0), (1.0, -0.1),
                                       (float("nan"), 1e-6)])
def test_gaussian_sigma_refuses_budgets_outside_the_domain(eps, delta):
    with pytest.raises(PrivacyBudgetError, match="epsilon > 0 and 0 < delta < 1"):
        gaussian_sigma(eps, delta, 1.0)


@pytest.mark.parametrize("sigma,delta,k", [(3.0, 1e-6, 1), (12.5, 1e-5, 16), (40.0, 1e-7, 64)])
def test_set_union_threshold_bounds_a_lone_key_by_delta_over_two(sigma, delta, k):
    """A key only the added patient has (count 1) passes T with probability <= exp(-(T-1)^2 / (2 sigma^2)) per key;
    over their k keys that union bound must be exactly delta / 2."""
    t = set_union_threshold(sigma, delta, k)
    assert t > 1
    assert k * math.exp(-((t - 1) ** 2) / (2 * sigma ** 2)) == pytest.approx(delta / 2, rel=1e-9)


# ---------------------------------------------------------------- dpnoise: the noise itself

def _discrete_laplace_variance(scale: float) -> float:
    a = math.exp(-1 / scale)
    return 2 * a / (1 - a) ** 2


@pytest.mark.parametrize("secure", [True, False])
def test_laplace_noise_has_the_scale_of_its_epsilon(secure):
    noise = NoiseSource.secure_source() if secure else NoiseSource.reproducible(3)
    counts = np.full((200, 250), 7)  # 2-d: the shape must come back
    noisy, scale = noise.laplace(counts, 0.5, "a test histogram")
    assert scale == 2.0 and noisy.shape == counts.shape and noisy.dtype.kind == "i"
    d = (noisy - counts).ravel()
    assert abs(d.mean()) < 0.05
    assert d.var() == pytest.approx(_discrete_laplace_variance(2.0), rel=0.04)
    assert (d != 0).mean() > 0.5  # noise is really added


@pytest.mark.parametrize("secure", [True, False])
def test_gaussian_noise_has_std_sigma(secure):
    noise = NoiseSource.secure_source() if secure else NoiseSource.reproducible(4)
    counts = np.arange(40_000).reshape(200, 200)
    noisy = noise.gaussian(counts, 6.0)
    assert noisy.shape == counts.shape and noisy.dtype.kind == "i"
    d = (noisy - counts).ravel()
    assert abs(d.mean()) < 0.15
    rounding = 0.0 if secure else 1 / 12  # the seeded fallback rounds a continuous Gaussian
    assert d.var() == pytest.approx(36.0 + rounding, rel=0.04)


@pytest.mark.parametrize("secure", [True, False])
def test_empty_count_vectors_stay_empty(secure):
    noise = NoiseSource.secure_source() if secure else NoiseSource.reproducible(5)
    assert noise.gaussian(np.zeros(0, dtype=np.int64), 2.0).shape == (0,)
    noisy, scale = noise.laplace(np.zeros(0, dtype=np.int64), 1.0, "nothing")
    assert noisy.shape == (0,) and scale == 1.0


@pytest.mark.parametrize("eps", [0.0, -1.0, None, float("nan")])
def test_laplace_refuses_a_budget_that_is_not_positive_naming_the_release(eps):
    for noise in (NoiseSource.secure_source(), NoiseSource.reproducible(1)):
        with pytest.raises(PrivacyBudgetError) as err:
            noise.laplace(np.ones(3, dtype=np.int64), eps, "the sex marginal")
        assert "the sex marginal needs epsilon > 0" in str(err.value)


def test_noise_only_takes_integer_counts():
    for noise in (NoiseSource.secure_source(), NoiseSource.reproducible(1)):
        with pytest.raises(ValueError) as err:
            noise.gaussian(np.array([1.0, 2.5]), 1.0)
        assert str(err.value) == "DP counts must be integers"
        assert noise.gaussian(np.array([1.0, 2.0]), 1e-3).tolist() == [1, 2]  # integral floats are fine


def test_seeded_noise_replays_and_secure_noise_does_not():
    counts = np.zeros(64, dtype=np.int64)
    a, b, c = NoiseSource.reproducible(9), NoiseSource.reproducible(9), NoiseSource.reproducible(10)
    assert np.array_equal(a.gaussian(counts, 5.0), b.gaussian(counts, 5.0))
    assert not np.array_equal(NoiseSource.reproducible(9).gaussian(counts, 5.0), c.gaussian(counts, 5.0))
    s1, s2 = NoiseSource.secure_source(), NoiseSource.secure_source()
    assert s1.secure is True and s1.seed is None and a.secure is False and a.seed == 9
    assert not np.array_equal(s1.gaussian(counts, 5.0), s2.gaussian(counts, 5.0))
    assert "NO privacy guarantee" in a.description and "CSPRNG" in s1.description
    assert "NO privacy" not in s1.description


# ---------------------------------------------------------------- train.py: the budget and the accountant

def test_default_delta_is_below_one_over_n():
    for n in (100, 10_000):  # 1e-5 caps delta for small cohorts
        assert default_delta(n) == 1e-5
    for n in (1_000_000, 50_000_000):
        assert default_delta(n) == pytest.approx(n ** -1.1, rel=1e-12) and default_delta(n) < 1e-5
    assert all(default_delta(n) < 1 / n for n in (100, 10_000, 1_000_000))


@pytest.mark.parametrize("n,b,steps", [(1000, 100, 10), (1001, 100, 11), (5, 100, 1), (0, 10, 1), (99, 1, 99)])
def test_steps_per_epoch_is_the_ceiling(n, b, steps):
    assert steps_per_epoch_for(n, b) == steps


def test_accounted_steps_sum_the_history():
    assert accounted_steps([]) == 0
    assert accounted_steps([(1.0, 0.01, 30), (1.2, 0.02, 12)]) == 42


def test_epsilons_are_opacus_accountants_on_the_history():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    assert epsilons([], 1e-5) == (0.0, 0.0)
    history = [(1.1, 0.02, 300), (0.9, 0.01, 200)]
    prv, rdp = epsilons(history, 1e-5)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    curve = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    eps_rdp, _ = get_privacy_spent(orders=orders, rdp=curve, delta=1e-5)
    assert rdp == pytest.approx(eps_rdp, rel=1e-9)
    assert 0 < prv < rdp  # PRV is the tighter of the two here
    assert epsilons(history, 1e-7)[0] > prv  # a smaller delta costs epsilon
    assert epsilons(history[:1], 1e-5)[0] < prv  # fewer steps cost less


@pytest.mark.parametrize("eps,q,steps,released", [(1.0, 0.02, 500, 0.0), (8.0, 0.05, 200, 0.0),
                                                   (0.5, 0.01, 1000, 0.0), (8.0, 0.08, 130, 0.3),
                                                   (3.0, 0.25, 40, 0.05)])
def test_noise_multiplier_fills_the_budget_left_from_below(eps, q, steps, released):
    """The DP-SGD noise composed with releases of zCDP rho `released` lands within the search tolerance under
    the target, recomputed here with Opacus' own RDP functions."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(composition.ORDERS)
    fixed = np.asarray(orders) * released
    sigma = composition.sgd_noise_multiplier(eps, 1e-5, q, steps, fixed)
    curve = fixed + np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    spent = get_privacy_spent(orders=orders, rdp=curve, delta=1e-5)[0]
    assert eps - 0.006 <= spent <= eps
    # the releases cost the training noise: the same steps alone need less
    if released:
        assert composition.sgd_noise_multiplier(eps, 1e-5, q, steps, np.zeros(len(orders))) < sigma


def test_noise_multiplier_names_an_unreachable_budget():
    zeros = np.zeros(len(composition.ORDERS))
    with pytest.raises(PrivacyBudgetError, match="cannot reach epsilon=1e-06"):
        composition.sgd_noise_multiplier(1e-6, 1e-5, 1.0, 10_000, zeros)
    with pytest.raises(PrivacyBudgetError, match="releases before training already spend"):
        composition.sgd_noise_multiplier(1.0, 1e-5, 0.1, 10, np.asarray(composition.ORDERS) * 5.0)


def _config(**kw):
    from fhirsynth.model.config import TrainConfig

    # the report is written after train_model resolved the epochs (TrainConfig's None = default_epochs)
    return replace(TrainConfig(epochs=10), **kw)


@pytest.mark.parametrize("kw,where", [
    ({"epsilon": 0.0}, "--epsilon"), ({"epsilon": -2.0}, "--epsilon"), ({"epsilon": float("inf")}, "--epsilon"),
    ({"epsilon": None}, "--epsilon"), ({"epsilon": MAX_EPSILON * 1.01}, "--epsilon"),
    ({"epsilon": 1.0, "delta": 1.0}, "--delta"), ({"epsilon": 1.0, "delta": 0.0}, "--delta"),
    ({"epsilon": 1.0, "max_grad_norm": 0.0}, "--max-grad-norm"),
    ({"epsilon": 1.0, "vocab_epsilon_fraction": 1.0}, None), ({"epsilon": 1.0, "vocab_delta_fraction": 0.0}, None),
])
def test_validate_refuses_a_budget_that_gives_no_guarantee(kw, where):
    with pytest.raises(PrivacyBudgetError) as err:
        _validate(_config(dp=True, **kw))
    assert err.value.where == where


def test_validate_accepts_the_edges_and_skips_budget_checks_without_dp():
    _validate(_config(dp=True, epsilon=MAX_EPSILON, delta=None))
    _validate(_config(dp=True, epsilon=0.01, delta=0.5, vocab_epsilon_fraction=0.94, vocab_delta_fraction=0.94,
                      measure_epsilon_fraction=0.0, measure_delta_fraction=0.0))
    _validate(_config(dp=True, epsilon=1.0, vocab_epsilon_fraction=0.7, measure_epsilon_fraction=0.24))
    with pytest.raises(PrivacyBudgetError) as err:  # the vocabulary and the measurements must leave some for training
        _validate(_config(dp=True, epsilon=1.0, vocab_epsilon_fraction=0.7, measure_epsilon_fraction=0.25))
    assert err.value.message == "the vocabulary and measurement shares leave (almost) nothing for training"
    _validate(_config(dp=False, epsilon=None, max_grad_norm=0.0))
    _validate(_config(dp=False, epochs=1, batch_size=1, max_physical_batch=1, lr=1e-9, warmup_frac=0.0))


def test_validate_messages_say_what_and_which_value():
    cases = [({"epsilon": -2.0}, "must be a positive finite number (got -2.0)"),
             ({"epsilon": 101.0}, "epsilon 101 is above 100 and gives no meaningful guarantee; use --no-dp for a "
                                  "non-private comparison model"),
             ({"delta": 1.5}, "must be in (0, 1) or auto (got 1.5)"),
             ({"vocab_delta_fraction": 1.0}, "vocabulary budget fractions must be in (0, 1)"),
             ({"vocab_epsilon_fraction": 0.0}, "vocabulary budget fractions must be in (0, 1)"),
             ({"max_grad_norm": -1.0}, "must be > 0 (got -1.0)")]
    for kw, message in cases:
        with pytest.raises(PrivacyBudgetError) as err:
            _validate(_config(dp=True, **{"epsilon": 1.0, **kw}))
        assert err.value.message == message
    problems = {"epochs": (0, "--epochs must be >= 1 (got 0)"), "batch_size": (0, "--batch-size must be >= 1 (got 0)"),
                "max_physical_batch": (0, "--max-physical-batch must be >= 1 (got 0)"),
                "lr": (0.0, "learning rate must be > 0 (got 0.0)"),
                "warmup_frac": (1.0, "warmup fraction must be in [0, 1) (got 1.0)"),
                "entry_weight": (1.5, "entry weight must be in [0, 1] (got 1.5)")}
    for name, (value, message) in problems.items():
        with pytest.raises(UsageError) as err:
            _validate(_config(dp=False, **{name: value}))
        assert err.value.message == message
    with pytest.raises(UsageError) as err:
        _validate(_config(dp=False, epochs=0, lr=-1.0, warmup_frac=-0.5))
    assert err.value.message == ("--epochs must be >= 1 (got 0); learning rate must be > 0 (got -1.0); "
                                 "warmup fraction must be in [0, 1) (got -0.5)")  # every problem at once


# what each documentation field of privacy.json must say (a reader checks the guarantee against it)
DOCUMENTED = {
    "sizes": "sample_rate, steps, warm-up and delta (auto) derive from n_estimate, the sum of the DP sex histogram's "
             "noisy counts (vocabulary.sex_marginal); the exact patient count is not released",
    "composition": "Renyi DP (fhirsynth/model/composition.py): the RDP curves of every release add up order by "
                   "order (discrete Gaussian rho-zCDP: a * rho; discrete Laplace at epsilon: min(epsilon, a "
                   "epsilon^2 / 2); DP-SGD: Opacus compute_rdp over the accountant's history); epsilon_total is "
                   "Opacus' get_privacy_spent of the sum at delta_conversion = delta - delta_thresholds (the "
                   "set-union thresholds' failure probabilities). epsilon_preprocessing, epsilon_measurements and "
                   "epsilon_training (max of Opacus' PRV and RDP accountants at delta_conversion) are each part "
                   "alone, for reference: they do not add up to the total",
    "adjacency": "add/remove one patient (all of their resources)",
    "accountants": "noise multiplier = the smallest whose DP-SGD RDP (Opacus), composed with the releases before "
                   "training, converts to at most epsilon_target (composition.sgd_noise_multiplier)",
    "public_settings": "bin edges (mappings/reference-ranges.toml), time buckets, max_len, grammar, "
                       "reference date: public, no budget",
    "not_released": "training loss (private, console only); the exact patient count",
    "noise_source": "secret: DP-SGD Poisson sampling and Gaussian noise from os.urandom (securerng); the released "
                    "counts from OpenDP's discrete Laplace / discrete Gaussian (OS CSPRNG); no noise seed exists",
}


def test_privacy_report_documents_how_each_number_is_computed():
    tc = _config(dp=True, epsilon=8.0, delta=1e-5)
    p = _privacy_report(tc, 500, 1.3, 0.02, 800, 6.1, 6.4, _vocab_report(), _meas_report(), _composed())
    for key, text in DOCUMENTED.items():
        assert p[key] == text, key
    assert p["mechanisms"]["training"] == (
        "DP-SGD (Opacus): Poisson sampling at sample_rate, per-patient clipping to max_grad_norm, Gaussian noise "
        "noise_multiplier * max_grad_norm; epsilon from Opacus' PRV and RDP accountants over `steps` steps")
    assert p["mechanisms"]["preprocessing"] == ("vocabulary: m; sex marginal, deaths per birth band: discrete "
                                                "Laplace; value bins: discrete Gaussian (see vocabulary)")
    seeded = _privacy_report(_config(dp=True, epsilon=8.0, delta=1e-5, reproducible_noise=True), 500, 1.3, 0.02,
                             800, 6.1, 6.4, _vocab_report(), _meas_report(), _composed())
    assert seeded["guarantee"] == ("NONE: noise reproducible from a stored seed (--reproducible-noise, for tests and "
                                   "research); the epsilon below holds only against an adversary who cannot replay "
                                   "the seed")
    assert seeded["guarantee"] != p["guarantee"] == "(epsilon_total, delta)-DP for each patient, add/remove-one adjacency"
    plain = _privacy_report(_config(dp=False), 500, 0.0, 0.02, 800, None, None, _vocab_report())
    assert plain["epsilon_note"] == "no differential privacy: epsilon = infinity (JSON null)"
    assert plain["guarantee"] == "none: trained without differential privacy"
    assert plain["vocabulary"]["note"] == "vocabulary from exact counts (not private)"
    assert "derive from n_estimate" not in str(plain) and (plain["epochs"], plain["batch_size"]) == (10, 64)
    assert set(plain) == {"unit", "dp", "n_estimate", "epsilon_target", "epsilon_prv", "epsilon_rdp",
                          "epsilon_training", "epsilon_preprocessing", "epsilon_total", "guarantee", "epsilon_note",
                          "delta", "noise_multiplier", "sample_rate", "steps", "epochs", "batch_size",
                          "max_grad_norm", "vocabulary", "measurements"}


def _vocab_report() -> dict:
    return {"mechanism": "m", "epsilon": 0.5, "epsilon_total": 1.2, "delta_total": 4e-6}


def _meas_report() -> dict:
    return {"epsilon": 1.6, "delta": 1e-6}


def _composed() -> dict:
    return {"epsilon": 7.9, "delta_conversion": 9.7e-6, "delta_thresholds": 3e-7, "rho": {"a": 0.1}}


# what privacy.json holds (the server's /$privacy-report and the evaluator read these keys)
DP_REPORT_KEYS = {
    "unit", "dp", "guarantee", "adjacency", "noise_source", "n_estimate", "sizes", "epsilon_target", "epsilon_prv",
    "epsilon_rdp", "epsilon_training", "epsilon_preprocessing", "epsilon_total", "delta", "delta_conversion",
    "delta_thresholds", "delta_preprocessing", "rho", "budget_shares", "composition", "mechanisms", "noise_multiplier", "sample_rate", "steps", "epochs",
    "batch_size", "max_grad_norm", "poisson_sampling", "reproducible_noise", "accountants", "vocabulary",
    "public_settings", "not_released", "epsilon_measurements", "delta_measurements", "measurements"}


def test_privacy_report_takes_the_composed_total_and_reports_the_parts():
    tc = _config(dp=True, epsilon=8.0, delta=1e-5, reproducible_noise=False)
    for prv, rdp in ((6.1, 6.4), (6.4, 6.1)):
        p = _privacy_report(tc, 500, 1.3, 0.02, 800, prv, rdp, _vocab_report(), _meas_report(), _composed())
        assert p["dp"] is True and p["epsilon_training"] == 6.4
        # the total is the composition's; each part alone is what its own report says
        assert (p["epsilon_total"], p["delta_conversion"], p["delta_thresholds"]) == (7.9, 9.7e-6, 3e-7)
        assert (p["epsilon_preprocessing"], p["epsilon_measurements"]) == (1.2, 1.6)
        assert (p["delta_preprocessing"], p["delta_measurements"], p["delta"]) == (4e-6, 1e-6, 1e-5)
        assert (p["epsilon_prv"], p["epsilon_rdp"]) == (prv, rdp) and p["rho"] == {"a": 0.1}
        assert p["budget_shares"] == {
            "preprocessing": tc.vocab_epsilon_fraction, "measurements": tc.measure_epsilon_fraction,
            "unit": "shares of the zCDP rho of (epsilon_target, delta); DP-SGD fills the rest"}
        assert (p["noise_multiplier"], p["sample_rate"], p["steps"], p["n_estimate"]) == (1.3, 0.02, 800, 500)
        assert p["epsilon_target"] == 8.0 and p["max_grad_norm"] == tc.max_grad_norm
        assert p["guarantee"].startswith("(epsilon_total, delta)-DP") and p["reproducible_noise"] is False
        assert p["unit"] == "patient" and "one patient" in p["adjacency"] and p["poisson_sampling"] is True
        assert "os.urandom" in p["noise_source"] and "seed" not in p["noise_source"].replace("no noise seed", "")
        assert p["vocabulary"] == _vocab_report() and "vocabulary: m;" in p["mechanisms"]["preprocessing"]
        assert (p["epochs"], p["batch_size"]) == (tc.epochs, tc.batch_size)
        assert set(p) == DP_REPORT_KEYS


def test_privacy_report_says_when_there_is_no_guarantee():
    seeded = _privacy_report(_config(dp=True, epsilon=8.0, delta=1e-5, reproducible_noise=True, seed=77), 500, 1.3,
                             0.02, 800, 6.1, 6.4, _vocab_report(), _meas_report(), _composed())
    assert seeded["guarantee"].startswith("NONE") and "seed 77" in seeded["noise_source"]
    assert seeded["reproducible_noise"] is True
    plain = _privacy_report(_config(dp=False), 500, 0.0, 0.02, 800, None, None, _vocab_report())
    assert plain["dp"] is False and plain["guarantee"].startswith("none")
    assert all(plain[k] is None for k in ("epsilon_total", "epsilon_training", "epsilon_preprocessing", "delta"))
    assert plain["noise_multiplier"] == 0.0 and plain["unit"] == "patient" and plain["max_grad_norm"] is None
    assert (plain["n_estimate"], plain["sample_rate"], plain["steps"]) == (500, 0.02, 800)
    assert plain["vocabulary"]["mechanism"] == "m" and "not private" in plain["vocabulary"]["note"]
    assert plain["epsilon_target"] is None and plain["epsilon_prv"] is None and plain["epsilon_rdp"] is None


# ---------------------------------------------------------------- vocab.py: the preprocessing budget

@pytest.mark.parametrize("eps,delta", [(0.1, 1e-6), (1.0, 1e-6), (3.7, 4e-7)])
def test_preprocessing_parts_are_the_documented_shares_of_rho_and_sum_to_it(eps, delta):
    """Each part, calibrated the way its release calibrates it, has its documented share of the preprocessing's
    zCDP rho (sigma from OpenDP at the part's nominal epsilon), and the shares sum to that rho."""
    from fhirsynth.model.valuekinds import KIND_EPSILON_FRACTION
    from fhirsynth.model.vocab import DEATH_EPSILON_FRACTION, SEX_EPSILON_FRACTION, VALUE_EPSILON_FRACTION

    parts = split_preprocessing(eps, delta)
    assert parts.rho == pytest.approx(1 / (2 * gaussian_sigma(eps, delta, 1.0) ** 2), rel=1e-9)

    def rho_of(eps_part: float, d: float) -> float:  # a discrete Gaussian of sensitivity 1 at that nominal epsilon
        return 1 / (2 * gaussian_sigma(eps_part, d, 1.0) ** 2)

    items = rho_of(parts.items[0], parts.items[1] / 2)
    kinds = rho_of(*parts.kinds)
    values = rho_of(parts.values[0], parts.values[1] / 2)
    sex, death = parts.sex ** 2 / 2, parts.death ** 2 / 2
    rest = 1 - SEX_EPSILON_FRACTION - VALUE_EPSILON_FRACTION - DEATH_EPSILON_FRACTION
    expected = (rest * (1 - KIND_EPSILON_FRACTION), rest * KIND_EPSILON_FRACTION, VALUE_EPSILON_FRACTION,
                SEX_EPSILON_FRACTION, DEATH_EPSILON_FRACTION)
    got = (items, kinds, values, sex, death)
    assert [g / parts.rho for g in got] == pytest.approx(expected, rel=2e-3)  # OpenDP's bisection tolerance
    assert sum(got) == pytest.approx(parts.rho, rel=2e-3)
    assert parts.items[1] + parts.kinds[1] + parts.values[1] == pytest.approx(delta, rel=1e-12)
    from fhirsynth.model.valuekinds import KIND_DELTA_FRACTION
    from fhirsynth.model.vocab import VALUE_DELTA_FRACTION

    assert parts.values[1] == pytest.approx(delta * VALUE_DELTA_FRACTION, rel=1e-12)
    assert parts.kinds[1] == pytest.approx(delta * (1 - VALUE_DELTA_FRACTION) * KIND_DELTA_FRACTION, rel=1e-12)


def _cohort(sexes: list[str | None]) -> list[Timeline]:
    return [Timeline(PatientInfo(f"p{i}", sex=s, birth_date=date(1970, 1, 1))) for i, s in enumerate(sexes)]


def test_sex_shares_exact_without_dp():
    tls = _cohort(["male"] * 6 + ["female"] * 3 + [None])
    shares, report = release_sex_shares(tls, dp=False, epsilon=None, noise=NoiseSource.reproducible(0))
    assert shares == pytest.approx([0.6, 0.3, 0.0, 0.1]) and report["n_estimate"] == 10
    assert report["epsilon"] is None


def test_sex_shares_under_dp_have_laplace_noise_of_scale_one_over_epsilon():
    tls = _cohort(["male"] * 600 + ["female"] * 400)
    runs = [release_sex_shares(tls, dp=True, epsilon=0.5, noise=NoiseSource.reproducible(s)) for s in range(300)]
    report = runs[0][1]
    assert report["scale"] == 2.0 and report["threshold"] == 6.0 and report["epsilon"] == 0.5
    n = np.array([r["n_estimate"] for _, r in runs])
    # four cells, each with discrete Laplace(2) noise: the estimate's variance is 4x one cell's
    assert n.var() == pytest.approx(4 * _discrete_laplace_variance(2.0), rel=0.25)
    assert abs(n.mean() - 1000) < 1.0 and len(set(n.tolist())) > 5
    shares = np.array([s for s, _ in runs])
    assert np.allclose(shares.sum(axis=1), 1.0) and (shares[:, 2:] == 0).mean() > 0.9  # small cells zeroed
    assert shares[:, 0].mean() == pytest.approx(0.6, abs=0.005)
    assert set(report["shares"]) == set(SEXES)


# ---------------------------------------------------------------- dpbins.py: the value-bin release

def _valued_cohort(n: int, codes: list[str], seed: int = 0) -> list[Timeline]:
    from datetime import datetime, timezone

    from fhirsynth.timeline.types import Event

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        events = [Event(time=datetime(2020, 1, 1 + d, tzinfo=timezone.utc), kind="observation", system="urn:lab",
                        code=c, value=float(rng.normal(50, 5)), unit="mg", status="final")
                  for c in codes for d in range(2)]
        out.append(Timeline(PatientInfo(f"p{i}", sex="female", birth_date=date(1970, 1, 1)), events))
    return out


def test_value_bins_noise_is_calibrated_to_2m_changed_counts_and_half_the_delta():
    from fhirsynth.model.dpbins import release_value_bins
    from fhirsynth.model.vocab import Item

    codes = ["a", "b", "c"]
    items = [Item("observation", "urn:lab", c, c, "laboratory") for c in codes]
    for m in (1, 3):
        _, rep = release_value_bins(_valued_cohort(40, codes), items, public_codes=set(), m=m, dp=True, epsilon=2.0,
                                    delta=1e-5, min_count=1, noise=NoiseSource.reproducible(0))
        sigma = gaussian_sigma(2.0, 0.5e-5, math.sqrt(2 * m))
        assert rep["sigma"] == pytest.approx(sigma, rel=1e-9) and rep["max_codes_per_patient"] == m
        assert rep["threshold"] == pytest.approx(1 + sigma * math.sqrt(2 * math.log(2 * m / 1e-5)), rel=1e-9)
        assert (rep["epsilon"], rep["delta"], rep["candidate_codes"]) == (2.0, 1e-5, 3)


def test_value_bins_bound_each_patient_to_m_codes_only_under_dp():
    from fhirsynth.model.dpbins import patient_contributions

    tl = _valued_cohort(1, ["a", "b", "c"])[0]
    tl.events[0].value = 1000.0  # "a" now has values 1000 and ~50: the median of two
    keys = {("urn:lab", c) for c in "abc"}
    assert set(patient_contributions(tl, keys, 2)) == {("urn:lab", "a"), ("urn:lab", "b")}  # ties by code
    got = patient_contributions(tl, keys, 3)
    assert got[("urn:lab", "a")] == (pytest.approx((1000.0 + tl.events[1].value) / 2), "mg")
    assert patient_contributions(tl, {("urn:lab", "a")}, 3).keys() == {("urn:lab", "a")}


def test_seeded_noise_is_replayable_from_the_seed_alone():
    """What makes --reproducible-noise give NO guarantee: anyone with the seed redraws the exact noise (numpy PCG64:
    a rounded normal for the Gaussian, a difference of two geometrics for the discrete Laplace)."""
    counts = np.arange(50, dtype=np.int64)
    rng = np.random.default_rng(21)
    replay_g = counts + np.rint(rng.normal(0.0, 3.0, 50)).astype(np.int64)
    p = -math.expm1(-0.5)  # epsilon 0.5: scale 2
    replay_l = counts + rng.geometric(p, 50) - rng.geometric(p, 50)
    source = NoiseSource.reproducible(21)
    assert np.array_equal(source.gaussian(counts, 3.0), replay_g)
    assert np.array_equal(source.laplace(counts, 0.5, "x")[0], replay_l)


def _sex_release_replayed(counts: np.ndarray, eps: float, seed: int) -> tuple[list[float], int]:
    """The sex release recomputed from its definition: Laplace counts (same seeded draw), n_estimate from the sum
    before cells below 3 x scale are zeroed, uniform shares when nothing is left."""
    noisy, scale = NoiseSource.reproducible(seed).laplace(counts, eps, "replay")
    n_estimate = max(1, int(noisy.sum()))
    kept = np.where(noisy >= 3 * scale, noisy, 0)
    shares = (kept / kept.sum()).tolist() if kept.sum() > 0 else [0.25] * 4
    return shares, n_estimate


@pytest.mark.parametrize("cohort", [[], ["other"] * 6 + ["male"] * 40, ["female"] * 7 + ["unknown"] * 5])
def test_sex_release_post_processing_follows_its_definition(cohort):
    """Small cohorts put noisy counts at the threshold, the sum at or below 1 and every cell below it; the release
    must match the definition in each case, seed by seed."""
    tls = _cohort(cohort)
    counts = np.array([sum(sex_index_of(s) == i for s in cohort) for i in range(4)], dtype=np.int64)
    seen_uniform = seen_floor = False
    for seed in range(60):
        shares, report = release_sex_shares(tls, dp=True, epsilon=0.5, noise=NoiseSource.reproducible(seed))
        want, n_est = _sex_release_replayed(counts, 0.5, seed)
        assert shares == pytest.approx(want, abs=1e-12) and report["n_estimate"] == n_est
        assert report["shares"] == {s: round(x, 6) for s, x in zip(SEXES, want)}
        seen_uniform |= want == [0.25] * 4
        seen_floor |= n_est == 1
    if not cohort:
        assert seen_uniform and seen_floor  # the fallbacks were exercised


def sex_index_of(sex: str | None) -> int:
    return SEXES.index(sex) if sex in SEXES else SEXES.index("unknown")


def test_sex_release_reports_its_mechanism_and_budget():
    tls = _cohort(["male", "female"])
    _, dp = release_sex_shares(tls, dp=True, epsilon=0.25, noise=NoiseSource.reproducible(1))
    assert dp["mechanism"] == "discrete laplace histogram, cells below the threshold set to 0"
    assert (dp["epsilon"], dp["delta"], dp["scale"], dp["threshold"]) == (0.25, 0.0, 4.0, 12.0)
    _, plain = release_sex_shares(tls, dp=False, epsilon=None, noise=NoiseSource.reproducible(1))
    assert plain == {"mechanism": "exact counts (no DP)", "epsilon": None, "delta": None,
                     "shares": {"male": 0.5, "female": 0.5, "other": 0.0, "unknown": 0.0}, "n_estimate": 2}
    with pytest.raises(PrivacyBudgetError) as err:
        release_sex_shares(tls, dp=True, epsilon=0.0, noise=NoiseSource.reproducible(1))
    assert err.value.message == "the sex marginal needs epsilon > 0 (got 0.0)"


# ---------------------------------------------------------------- train.py: the budget split in zCDP rho

def _rho_of_target(eps: float, delta: float) -> float:
    """The rho whose RDP curve a * rho converts to eps at delta, by Opacus' conversion (bisection here)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = list(composition.ORDERS)
    lo, hi = 0.0, 50.0
    for _ in range(80):
        mid = (lo + hi) / 2
        spent = get_privacy_spent(orders=orders, rdp=[a * mid for a in orders], delta=delta)[0]
        lo, hi = (mid, hi) if spent <= eps else (lo, mid)
    return lo


@pytest.mark.parametrize("eps,delta,vf,mf", [(8.0, 1e-5, 0.25, 0.2), (1.0, 1e-6, 0.4, 0.1), (3.0, 2e-6, 0.25, 0.0)])
def test_budget_split_gives_each_release_its_share_of_rho(eps, delta, vf, mf):
    """The vocabulary's and the measurements' epsilons are those at which OpenDP's Gaussian (sensitivity 1, at
    their deltas) has their share of the target's rho; the budget is read at delta minus the vocabulary's delta."""
    from fhirsynth.model.train import _budget_split

    tc = _config(dp=True, epsilon=eps, delta=delta, vocab_epsilon_fraction=vf, measure_epsilon_fraction=mf,
                 measure_delta_fraction=0.1 if mf else 0.0)
    rho = _rho_of_target(eps, delta * (1 - tc.vocab_delta_fraction))
    eps_vocab, eps_meas = _budget_split(tc)
    sigma = gaussian_sigma(eps_vocab, delta * tc.vocab_delta_fraction, 1.0)
    assert 1 / (2 * sigma ** 2) == pytest.approx(vf * rho, rel=3e-3)
    if mf:
        sigma = gaussian_sigma(eps_meas, delta * tc.measure_delta_fraction, 1.0)
        assert 1 / (2 * sigma ** 2) == pytest.approx(mf * rho, rel=3e-3)
    else:
        assert eps_meas is None


def test_sex_epsilon_is_its_share_of_the_preprocessing_epsilon():
    from fhirsynth.model.vocab import SEX_EPSILON_FRACTION, sex_epsilon

    assert sex_epsilon(2.0) == pytest.approx(2.0 * SEX_EPSILON_FRACTION) and sex_epsilon(0.5) < sex_epsilon(2.0)
