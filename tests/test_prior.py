"""A public prior (`train --init`): its vocabulary joins the released one, its weights initialise every parameter
that means the same in the new network (matched by code, never by position), no budget is spent on it, and
privacy.json names it."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import timedelta

import pytest
import torch
from test_model_helpers import make_timelines

from fhirsynth.cli import main as cli_main
from fhirsynth.errors import UsageError
from fhirsynth.model.archs import build_network, visit_sizes
from fhirsynth.model.checkpoint import load_model, model_hash
from fhirsynth.model.config import ModelConfig, TokenizerConfig
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.prior import layout_keys, load_prior, network_config, transfer
from fhirsynth.model.train import train_model
from fhirsynth.model.visits import VisitLayout
from fhirsynth.model.vocab import build_vocab
from fhirsynth.timeline.io import read_timelines, write_timelines
from fhirsynth.timeline.types import Event

torch.set_num_threads(1)
# ICD-10-CM: outside the public code lists (public-codes.toml), so only data can bring these into a vocabulary
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
PRIOR_ONLY = ("J45.909", "Unspecified asthma, uncomplicated")
PRIVATE_ONLY = ("E78.5", "Hyperlipidemia, unspecified")
SHAPE = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_visits=24, n_components=3)
TK = dict(max_len=64, reference_date="2026-01-01")


def _with_condition(timelines, code):
    """Every patient with an encounter gets `code` at the first."""
    out = []
    for tl in timelines:
        first = next((e for e in tl.events if e.kind == "encounter"), None)
        if first is None:
            continue
        extra = Event(time=first.time + timedelta(minutes=1), kind="condition", system=ICD10, code=code[0],
                      display=code[1], category="encounter-diagnosis", encounter_id=first.encounter_id)
        out.append(dataclasses.replace(tl, events=[*tl.events, extra]).sorted())
    return out


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    public, private = root / "public", root / "private"
    write_timelines(_with_condition(make_timelines(60, seed=1), PRIOR_ONLY), public)
    write_timelines(_with_condition(make_timelines(60, seed=2), PRIVATE_ONLY), private)
    prior = root / "prior-model"
    train_model(public, prior, dp=False, epochs=1, batch_size=16, device="cpu", seed=1,
                model_config=ModelConfig(arch="visit", **SHAPE), tokenizer_config=TokenizerConfig(**TK))
    return root, public, private, prior


def _codes(vocab):
    return {(it.kind, it.code) for it in vocab.items}


def test_the_vocabulary_is_the_union(cohorts):
    _, _, private, prior_dir = cohorts
    tk = TokenizerConfig(**TK)
    prior = load_prior(prior_dir, tk, ModelConfig(), explicit_shape=False)
    tls = list(read_timelines(private))
    alone, _ = build_vocab(tls, tk, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0))
    union, report = build_vocab(tls, tk, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0),
                                prior=prior)
    assert ("condition", PRIOR_ONLY[0]) in _codes(prior.vocab) and ("condition", PRIOR_ONLY[0]) not in _codes(alone)
    assert ("condition", PRIVATE_ONLY[0]) in _codes(alone)
    assert _codes(union) == _codes(alone) | _codes(prior.vocab)
    assert len(union.items) == len({it.key for it in union.items})  # no item twice
    assert report["prior_items"] > 0


def test_transfer_copies_what_means_the_same_and_leaves_new_items_fresh(cohorts):
    _, _, private, prior_dir = cohorts
    tk = TokenizerConfig(**TK)
    prior = load_prior(prior_dir, tk, ModelConfig(), explicit_shape=False)
    vocab, _ = build_vocab(list(read_timelines(private)), tk, dp=False, epsilon=None, delta=None,
                           noise=NoiseSource.reproducible(0), prior=prior)
    mc = network_config(prior, ModelConfig())
    mc.visit_sizes = visit_sizes(vocab)
    torch.manual_seed(5)
    model = build_network(mc)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    counts = transfer(model, vocab, prior)
    new, old = model.state_dict(), prior.state_dict
    nk, ok = layout_keys(vocab), layout_keys(prior.vocab)
    # the index spaces really differ: positions alone would copy the wrong rows
    assert nk["content"] != ok["content"]
    assert counts["content_new"] == 1 and counts["content_matched"] == len(ok["content"])
    for space, name, dim in (("content", "item_head.weight", 0), ("content", "v_item.weight", 0),
                             ("features", "visit_in.weight", 1), ("values", "v_head.weight", 0),
                             ("enc", "enc_head.weight", 0), ("type", "type_head.weight", 0),
                             ("prev", "v_prev.weight", 0)):
        at = {k: i for i, k in enumerate(ok[space])}
        for i, key in enumerate(nk[space]):
            got = new[name].select(dim, i)
            if key in at:
                assert torch.equal(got, old[name].select(dim, at[key])), (name, key)
            else:
                assert torch.equal(got, fresh[name].select(dim, i)), (name, key)
    hyper = nk["content"].index(next(k for k in nk["content"] if k[2] == PRIVATE_ONLY[0]))
    assert torch.equal(new["item_head.bias"][hyper], fresh["item_head.bias"][hyper])
    for name in ("blocks.0.attn.qkv.weight", "eg_head.weight", "comp.weight", "age_in.weight"):
        if name in old:
            assert torch.equal(new[name], old[name])
    assert counts["parameters_copied_whole"] > 10


def test_training_from_a_prior_spends_no_budget_on_it_and_says_so(cohorts):
    root, _, private, prior_dir = cohorts
    kw = dict(epsilon=8.0, epochs=1, batch_size=16, max_physical_batch=8, device="cpu", seed=3,
              reproducible_noise=True, tokenizer_config=TokenizerConfig(**TK, max_items_per_patient=8))
    plain = train_model(private, root / "plain", model_config=ModelConfig(arch="visit", **SHAPE), **kw)
    with_prior = train_model(private, root / "with-prior", init=prior_dir, **kw)
    # the same releases and the same DP-SGD noise: the prior adds nothing to the accounting
    assert with_prior["epsilon_total"] == pytest.approx(plain["epsilon_total"])
    assert with_prior["noise_multiplier"] == pytest.approx(plain["noise_multiplier"])
    assert with_prior["epsilon_total"] <= 8.0
    rep = with_prior["prior"]
    assert rep["model_hash"] == model_hash(prior_dir) and rep["epsilon_spent"] == 0.0 and rep["prior_dp"] is False
    assert rep["parameters_transferred"]["content_matched"] > 0
    on_disk = json.loads((root / "with-prior" / "privacy.json").read_text())
    assert on_disk["prior"] == rep and "prior" not in on_disk["vocabulary"] and "prior" not in plain
    lm = load_model(root / "with-prior", "cpu")
    assert ("condition", PRIOR_ONLY[0]) in _codes(lm.vocab)  # the prior's codes can be generated
    config = json.loads((root / "with-prior" / "config.json").read_text())
    assert config["training"]["init_model_hash"] == model_hash(prior_dir)
    assert lm.model_config.d_model == SHAPE["d_model"] and lm.model_config.n_components == SHAPE["n_components"]
    assert VisitLayout(lm.vocab).NC == lm.model_config.visit_sizes["n_content"]


def test_a_prior_that_cannot_fit_is_refused_with_the_reason(cohorts, tmp_path, capsys):
    root, _, private, prior_dir = cohorts
    with pytest.raises(UsageError, match="max_age_years"):
        load_prior(prior_dir, TokenizerConfig(**TK, max_age_years=90), ModelConfig(), explicit_shape=False)
    with pytest.raises(UsageError, match="d_model 32 \\(prior 16\\)"):
        load_prior(prior_dir, TokenizerConfig(**TK), ModelConfig(d_model=32), explicit_shape=True)
    with pytest.raises(UsageError, match="visit models"):
        load_prior(prior_dir, TokenizerConfig(**TK), ModelConfig(arch="token"), explicit_shape=False)
    rc = cli_main(["train", str(private), "--out", str(tmp_path / "m"), "--init", str(prior_dir), "--layers", "2"])
    err = capsys.readouterr().err
    assert rc != 0 and "--layers" in err and "prior" in err and "Traceback" not in err
    rc = cli_main(["train", str(private), "--out", str(tmp_path / "m"), "--init", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert rc != 0 and "nothing" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_the_prior_items_are_kept_apart_from_the_release(cohorts):
    """Under DP the set-union release counts only the codes neither public nor the prior's: a prior item is in
    the vocabulary even where no patient holds it, and the released count covers the rest."""
    _, _, private, prior_dir = cohorts
    tk = TokenizerConfig(**TK, max_items_per_patient=8)
    prior = load_prior(prior_dir, tk, ModelConfig(), explicit_shape=False)
    tls = list(read_timelines(private))
    random.Random(0).shuffle(tls)
    vocab, report = build_vocab(tls, tk, dp=True, epsilon=4.0, delta=1e-5, noise=NoiseSource.reproducible(1),
                                prior=prior)
    assert ("condition", PRIOR_ONLY[0]) in _codes(vocab)
    assert report["prior_items"] + report["public_items"] + report["selected_items"] == len(vocab.items)
