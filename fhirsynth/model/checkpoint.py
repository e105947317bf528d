"""Model directories (what a trained model is) and resumable training checkpoints.

A model dir holds exactly:
  model.pt             state_dict only (loaded with torch.load(weights_only=True); no pickled objects)
  config.json          format version + model / tokenizer / training configs (public settings)
  vocab.json           the token vocabulary (public items + DP-selected items, bin edges)
  privacy.json         the privacy report
  training-curve.json  + .csv: step, epoch, epsilon spent (and loss only for --no-dp runs, see train.py)
  measurements.json    (optional) DP statistics that `generate` calibrates to (measurements.py, calibrate.py)
No training record (patient ids, sequences, per-patient numbers) is ever written into it.
While training, a work directory BESIDE the model dir (train.default_work_dir, or --work-dir) holds the resumable
private state; it is removed when training finishes or aborts, never written inside MODEL_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirsynth.errors import ModelDirError
from fhirsynth.model.config import (
    FORMAT_VERSION,
    ModelConfig,
    TokenizerConfig,
    from_json,
)

WEIGHTS = "model.pt"
CONFIG = "config.json"
VOCAB = "vocab.json"
PRIVACY = "privacy.json"
CURVE_JSON = "training-curve.json"
CURVE_CSV = "training-curve.csv"
CHECKPOINT_STATE = "state.pt"
MEASUREMENTS = "measurements.json"  # optional: DP statistics for calibration (measurements.py)
REQUIRED = (WEIGHTS, CONFIG, VOCAB, PRIVACY)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelDirError("model directory not found", where=str(model_dir))
    missing = [f for f in REQUIRED if not (model_dir / f).is_file()]
    if missing:
        raise ModelDirError(f"not a model directory: missing {', '.join(missing)} (run `fhirsynth train`)",
                            where=str(model_dir))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"unreadable JSON ({exc})", where=str(path)) from None
    if not isinstance(data, dict):
        raise ModelDirError("expected a JSON object", where=str(path))
    return data


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    model_dir = Path(model_dir)
    _check_dir(model_dir)
    cfg = _read_json(model_dir / CONFIG)
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"model format version {cfg.get('format_version')!r} is not supported by this fhirsynth "
            f"(expects {FORMAT_VERSION}; made by fhirsynth {cfg.get('fhirsynth_version', '?')}); retrain the model",
            where=str(model_dir / CONFIG),
        )
    return cfg


def read_privacy_report(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The model's privacy.json (validated to be a model dir of this format version)."""
    model_dir = Path(model_dir)
    read_config(model_dir)
    return _read_json(model_dir / PRIVACY)


def guaranteed_privacy(privacy: dict[str, Any]) -> tuple[float | None, float | None]:
    """(epsilon, delta) that a model's privacy report guarantees, or (None, None) when it guarantees nothing:
    trained without DP, or with --reproducible-noise (its noise can be replayed from the stored seed)."""
    if privacy.get("dp") is False or privacy.get("reproducible_noise"):
        return None, None
    eps, delta = privacy.get("epsilon_total", privacy.get("epsilon")), privacy.get("delta")
    return (float(eps) if isinstance(eps, int | float) else None,
            float(delta) if isinstance(delta, int | float) else None)


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over weights + config + vocab (names and bytes), identifying exactly what generates data."""
    model_dir = Path(model_dir)
    _check_dir(model_dir)
    h = hashlib.sha256()
    # the calibration measurements shape the output too; a model without them hashes as before
    names = (WEIGHTS, CONFIG, VOCAB) + ((MEASUREMENTS,) if (model_dir / MEASUREMENTS).is_file() else ())
    for name in names:
        h.update(name.encode() + b"\0")
        with open(model_dir / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedModel:
    model: Any  # Transformer
    vocab: Any  # Vocab
    model_config: ModelConfig
    tokenizer_config: TokenizerConfig
    config: dict[str, Any]
    device: Any


def resolve_device(device: str = "auto"):
    import torch

    from fhirsynth.errors import UsageError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda (got {device!r})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def load_model(model_dir: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """Validate and load a model dir; every problem is a ModelDirError naming the file."""
    import torch

    from fhirsynth.model.archs import build_network, visit_sizes
    from fhirsynth.model.config import ARCHS
    from fhirsynth.model.vocab import Vocab

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    try:
        mcfg = from_json(ModelConfig, cfg["model"])
        tcfg = from_json(TokenizerConfig, cfg["tokenizer"])
    except (KeyError, TypeError) as exc:
        raise ModelDirError(f"config.json is malformed ({exc})", where=str(model_dir / CONFIG)) from None
    vocab = Vocab.from_json(tcfg, _read_json(model_dir / VOCAB))
    if vocab.size != mcfg.vocab_size:
        raise ModelDirError(f"vocab.json has {vocab.size} tokens but config.json says {mcfg.vocab_size}",
                            where=str(model_dir))
    if mcfg.arch not in ARCHS:
        raise ModelDirError(f"unknown model architecture {mcfg.arch!r} (this fhirsynth knows {', '.join(ARCHS)}); "
                            "retrain with this version", where=str(model_dir / CONFIG))
    if mcfg.arch == "visit" and mcfg.visit_sizes != visit_sizes(vocab):
        raise ModelDirError("vocab.json does not match the visit model's sizes in config.json", where=str(model_dir))
    dev = resolve_device(device)
    try:
        state = torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure means a corrupt file
        raise ModelDirError(f"weights file is corrupt or not a state_dict ({type(exc).__name__}: {exc})",
                            where=str(model_dir / WEIGHTS)) from None
    model = build_network(mcfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelDirError(f"weights do not match config.json ({str(exc).splitlines()[0]})",
                            where=str(model_dir / WEIGHTS)) from None
    model.to(dev).eval()
    return LoadedModel(model, vocab, mcfg, tcfg, cfg, dev)


def write_model_dir(
    out_dir: Path, *, state_dict: dict, config: dict, vocab: dict, privacy: dict, curve: list[dict],
    extra: dict[str, dict] | None = None,
) -> None:
    """Each file atomically; privacy.json last, so a model dir with one is complete. extra: more JSON files (name ->
    document), e.g. the DP measurements for calibration."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in (extra or {}).items():
        atomic_write_json(out_dir / name, doc)
    if MEASUREMENTS not in (extra or {}):  # a model retrained without them must not keep an older model's
        (out_dir / MEASUREMENTS).unlink(missing_ok=True)
    atomic_torch_save(out_dir / WEIGHTS, {k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    atomic_write_json(out_dir / CONFIG, config)
    atomic_write_json(out_dir / VOCAB, vocab)
    atomic_write_json(out_dir / CURVE_JSON, curve)
    cols = list(curve[0].keys()) if curve else ["step", "epoch", "epsilon"]
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else f"{r[c]}" for c in cols) for r in curve]
    atomic_write_bytes(out_dir / CURVE_CSV, ("\n".join(lines) + "\n").encode())
    atomic_write_json(out_dir / PRIVACY, privacy)
