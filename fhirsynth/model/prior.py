"""A public prior (issue 15 item 3): `train --init PUBLIC_MODEL` starts training from a visit model trained on
public data (a cohort made by an open simulator, say) instead of from random weights.

Nothing here reads the private data, so the prior costs no privacy budget: its vocabulary joins the released one
as public items (the union: the private release only decides about codes the prior does not already hold), its
value bins are taken as they are, and its weights initialise every parameter of the new network whose meaning
is the same in both, matched by key (an item's code, a (code, value bin) pair, an answer, a duration bucket),
never by position. Parameters of items the prior lacks keep their fresh initialisation. privacy.json names the
prior and its fingerprint, so a reader can check what the model started from.

The caller vouches that the prior's training data is public (or released under its own guarantee): its privacy
covers the data it was trained on, not this one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fhirsynth.errors import UsageError
from fhirsynth.model.bins import ValueBins
from fhirsynth.model.config import ModelConfig, TokenizerConfig
from fhirsynth.model.vocab import Item, Vocab

log = logging.getLogger(__name__)

# TokenizerConfig fields that shape the token space outside the items: the prior's must equal the new model's
SHAPE_FIELDS = ("birth_year_start", "birth_year_end", "birth_year_width", "max_age_years")
# ModelConfig fields that shape the network: the new model takes the prior's (explicit different ones are refused)
NETWORK_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_visits", "n_components", "n_age_ids")


@dataclass
class Prior:
    path: Path
    vocab: Vocab
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    model_hash: str  # checkpoint.model_hash: weights, config, vocabulary (and measurements)
    privacy: dict[str, Any]  # the prior's own privacy.json

    @property
    def items(self) -> list[Item]:
        return list(self.vocab.items)

    @property
    def value_kinds(self) -> dict[tuple, list[str]]:
        """Item key -> the value kinds the prior holds for it (public to this training)."""
        return {self.vocab.items[i].key: kinds for i, kinds in (self.vocab.value_kinds or {}).items()}

    @property
    def value_bins(self) -> dict[tuple[str, str], ValueBins]:
        """Bins of the prior's non-public observation codes (public to this training)."""
        return dict(self.vocab.private_value_bins)

    def report(self, transferred: dict[str, int] | None = None) -> dict[str, Any]:
        """What privacy.json says about the prior."""
        return {
            "model": str(self.path), "model_hash": self.model_hash,
            "prior_dp": bool(self.privacy.get("dp")), "prior_epsilon_total": self.privacy.get("epsilon_total"),
            "items": len(self.vocab.items), "epsilon_spent": 0.0,
            "note": "initial weights, vocabulary items and value bins of a model trained on other (public) data; "
                    "no privacy budget of this training is spent on them (they do not depend on its data)",
            **({"parameters_transferred": transferred} if transferred is not None else {}),
        }


def load_prior(path: str | Path, tk: TokenizerConfig, mc: ModelConfig, *, explicit_shape: bool) -> Prior:
    """Load and check a prior model dir. explicit_shape: the caller chose network sizes itself; they must then
    equal the prior's (the weights are copied, not resized)."""
    from fhirsynth.model.checkpoint import load_model, model_hash, read_privacy_report

    p = Path(path)
    lm = load_model(p, "cpu")  # a ModelDirError names the file when p is not a readable model dir
    pmc = lm.model_config
    if pmc.arch != "visit" or mc.arch != "visit":
        raise UsageError(f"--init needs visit models (the prior is {pmc.arch!r}, this training {mc.arch!r})",
                         where=str(p))
    for f in SHAPE_FIELDS:
        if getattr(lm.vocab.cfg, f) != getattr(tk, f):
            raise UsageError(f"the prior's tokenizer setting {f} = {getattr(lm.vocab.cfg, f)} differs from this "
                             f"training's {getattr(tk, f)}", where=str(p))
    if explicit_shape:
        diff = [f"{f} {getattr(mc, f)} (prior {getattr(pmc, f)})" for f in NETWORK_FIELDS
                if getattr(mc, f) != getattr(pmc, f)]
        if diff:
            raise UsageError("network sizes differ from the prior's: " + ", ".join(diff) + "; leave them out to "
                             "take the prior's", where="--init")
    state = {k: v.detach().cpu() for k, v in lm.model.state_dict().items()}
    return Prior(p, lm.vocab, pmc, state, model_hash(p), read_privacy_report(p))


def network_config(prior: Prior, mc: ModelConfig) -> ModelConfig:
    """mc with the prior's network sizes (the vocabulary-dependent sizes are filled in by training)."""
    return dataclasses.replace(mc, **{f: getattr(prior.model_config, f) for f in NETWORK_FIELDS}, visit_sizes=None)


# ---- matching parameters by meaning -------------------------------------------------------------------------

def layout_keys(vocab: Vocab) -> dict[str, list]:
    """A key per index of every vocabulary-dependent index space of the visit model (visits.VisitLayout)."""
    from fhirsynth.model.visits import VisitLayout

    L = VisitLayout(vocab)

    def key(tok: int) -> tuple:
        return vocab.item_of(tok).key

    content = [key(t) for t in L.content_tokens]
    answers = [("answer", key(t)) for t in L.answer_tokens]
    enc = [("none",)] + [key(t) for t in L.enc_tokens]
    etype = [("none",)] + [key(t) for t in L.type_tokens]
    values = ([("none",)] + [("bin", b) for b in range(L.n_val)] + answers
              + [("dur", d) for d in range(L.n_dur)])
    features = ([("enc", k) for k in enc[1:]] + [("type", k) for k in etype[1:]]
                + [("edur", d) for d in range(L.n_dur)] + [("item", k) for k in content])
    for j in range(L.NC):
        features += [("pair", content[j], b) for b in range(int(L.n_bins[j]))]
    features += answers + [("cdur", d) for d in range(L.n_dur)]
    assert len(features) == L.n_features and len(values) == L.n_values
    return {"content": content, "enc": enc, "type": etype, "values": values, "features": features,
            "prev": features + [("none",)]}


# parameter name -> the index space of each of its dimensions (None: a network dimension, equal in both)
SPACES: dict[str, tuple[str | None, ...]] = {
    "visit_in.weight": (None, "features"),
    "item_head.weight": ("content", None), "item_head.bias": ("content",),
    "enc_head.weight": ("enc", None), "enc_head.bias": ("enc",),
    "type_head.weight": ("type", None), "type_head.bias": ("type",),
    "v_item.weight": ("content", None),
    "v_prev.weight": ("prev", None),
    "v_head.weight": ("values", None), "v_head.bias": ("values",),
}


def transfer(model: nn.Module, vocab: Vocab, prior: Prior) -> dict[str, int]:
    """Copy the prior's weights into model wherever they mean the same; returns counts for the report:
    parameters copied whole, and per index space the entries matched and the new ones left fresh."""
    new_keys, old_keys = layout_keys(vocab), layout_keys(prior.vocab)
    index: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    out = {"parameters_copied_whole": 0}
    for space, keys in new_keys.items():
        at = {k: i for i, k in enumerate(old_keys[space])}
        pairs = [(i, at[k]) for i, k in enumerate(keys) if k in at]
        new_i = torch.tensor([a for a, _ in pairs], dtype=torch.long)
        old_i = torch.tensor([b for _, b in pairs], dtype=torch.long)
        index[space] = (new_i, old_i)
        out[f"{space}_matched"] = len(pairs)
        out[f"{space}_new"] = len(keys) - len(pairs)
    state = model.state_dict()
    with torch.no_grad():
        for name, dst in state.items():
            src = prior.state_dict[name]
            spaces = SPACES.get(name)
            if spaces is None:
                if src.shape != dst.shape:  # network sizes are the prior's (network_config): a bug if not
                    raise AssertionError(f"{name}: prior {tuple(src.shape)} vs new {tuple(dst.shape)}")
                dst.copy_(src)
                out["parameters_copied_whole"] += 1
                continue
            # one vocabulary-dependent dimension per parameter: copy the matched entries along it
            dim = next(d for d, sp in enumerate(spaces) if sp is not None)
            new_i, old_i = index[spaces[dim]]
            dst.index_copy_(dim, new_i, src.index_select(dim, old_i))
    model.load_state_dict(state)
    log.info("prior %s: %s", prior.path, out)
    return out
