"""POST /Patient/$synthesize: sample new patients from the loaded model, store them, return them as a Bundle.

The model and assembler live in other packages (and pull in torch); they are imported only when called, so the
API itself never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import orjson
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from fhirsynth import __version__
from fhirsynth.api.bundle import bundle_bytes
from fhirsynth.api.context import ServerContext, base_url, fhir_response, read_body, require
from fhirsynth.api.errors import ApiError
from fhirsynth.api.parameters import parameters_items
from fhirsynth.errors import FhirsynthError, UsageError
from fhirsynth.store.sqlite import Store
from fhirsynth.testpoint import pause_point

log = logging.getLogger(__name__)

SEXES = ("male", "female", "other", "unknown")
_PARAM_NAMES = ("count", "seed", "sex", "age", "condition")


@dataclass
class SynthesizeRequest:
    count: int = 1
    seed: int | None = None
    sex: str | None = None
    age: tuple[int, int] | None = None
    condition: tuple[str, str] | None = None


def _bad(name: str, message: str) -> ApiError:
    return ApiError(400, f"{name}: {message}", code="invalid", expression=name)


def parse_synthesize(items: list[tuple[str, str]], max_count: int) -> SynthesizeRequest:
    req = SynthesizeRequest()
    for name, value in items:
        value = str(value).strip()
        if name in ("count", "seed"):
            if not re.fullmatch(r"-?\d+", value):
                raise _bad(name, f"must be an integer, got {value!r}")
            n = int(value)
            if name == "count":
                if not 1 <= n <= max_count:
                    raise _bad(name, f"must be between 1 and {max_count}")
                req.count = n
            else:
                req.seed = n
        elif name == "sex":
            if value not in SEXES:
                raise _bad(name, f"must be one of {', '.join(SEXES)}")
            req.sex = value
        elif name == "age":
            m = re.fullmatch(r"(\d{1,3})(?:-(\d{1,3}))?", value)
            if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
                raise _bad(name, f"must be N or MIN-MAX in years, got {value!r}")
            req.age = (int(m.group(1)), int(m.group(2) or m.group(1)))
        elif name == "condition":
            system, sep, code = value.partition("|")
            if not sep or not system or not code:
                raise _bad(name, f"must be SYSTEM|CODE, got {value!r}")
            req.condition = (system, code)
        elif name not in ("_format",):
            raise _bad(name, "unknown parameter (supported: count, seed, sex, age, condition)")
    return req


def synthesize_into(store: Store, model_dir: Path, req: SynthesizeRequest, *, profile: str = "us-core") -> list[bytes]:
    """Sample req.count patients, assemble them to FHIR, store them (one transaction) and return the bodies.

    Indexes come from a counter persisted in the store, so patient ids (derived from seed and index) never
    collide with patients generated earlier.
    """
    try:
        from fhirsynth.model.calibrate import generated_timelines
        from fhirsynth.model.checkpoint import guaranteed_privacy, model_hash, read_privacy_report
        from fhirsynth.timeline.assembler import GeneratorInfo, assemble_patient
    except ImportError as exc:
        raise ApiError(501, f"patient generation is not available in this installation ({exc})",
                       code="not-supported") from None
    with store.transaction() as conn:
        start = store.next_counter(conn, "synthesize_index", req.count)
    seed = req.seed if req.seed is not None else 1 + start
    pause_point("synthesize-generating")  # tests hold a generation here to drive the throttle deterministically
    epsilon, delta = guaranteed_privacy(read_privacy_report(model_dir))
    generator = GeneratorInfo(model_hash=model_hash(model_dir), epsilon=epsilon, delta=delta,
                              fhirsynth_version=__version__)
    resources: list[dict] = []
    sample = {"seed": seed, "sex": req.sex, "age": req.age, "condition": req.condition}
    # as `generate`: calibrated when the model holds measurements and no constraint is given (that samples
    # DEFAULT_POOL_FACTOR x count patients per call)
    timelines = generated_timelines(model_dir, req.count, sample)
    for k, timeline in enumerate(timelines):
        resources.extend(assemble_patient(timeline, profile=profile, seed=seed, index=start + k,
                                          generator=generator))
    return store.add(resources)


def add_routes(router: APIRouter, ctx: ServerContext) -> None:
    settings = ctx.settings
    gen_lock = asyncio.Lock()  # one generation at a time (sampling is CPU/GPU bound); waits without blocking
    waiting = 0  # calls queued behind gen_lock; bounded so a burst cannot pile up requests that time out anyway

    @router.post("/Patient/$synthesize", summary="generate new synthetic patients from the loaded model")
    async def synthesize(request: Request) -> Response:
        nonlocal waiting
        require(request, "Patient", "write")
        items = list(request.query_params.multi_items())
        body = await read_body(request, settings.max_body_bytes)
        if body.strip():
            items += parameters_items(body)
        req = parse_synthesize(items, settings.max_synthesize)
        if settings.model_dir is None:
            raise ApiError(501, "no model is loaded (start the server with --model MODEL_DIR)", code="not-supported")
        if gen_lock.locked() and waiting >= settings.synthesize_queue:
            raise ApiError(429, f"{waiting} $synthesize calls are already waiting for the generator; retry later",
                           code="throttled", headers={"Retry-After": "2"})
        waiting += 1
        try:
            await gen_lock.acquire()
        finally:
            waiting -= 1
        try:
            try:
                bodies = await run_in_threadpool(synthesize_into, ctx.store, settings.model_dir, req,
                                                 profile=settings.profile)
            except UsageError as exc:
                # a constraint this model cannot meet (unknown condition, age outside its bands): the request's
                # fault, so a 400 naming the parameter, not a 500
                name = (exc.where or "").lstrip("-")
                name = name if name in _PARAM_NAMES else None
                message = exc.message.replace(f"--{name}", name) if name else exc.message
                raise ApiError(400, message, code="invalid", expression=name) from None
            except FhirsynthError as exc:
                # the loaded model is unusable (corrupt, another format version): the server's fault, but an
                # OperationOutcome saying why rather than a bare 500 and a traceback
                log.error("$synthesize failed: %s", exc)
                raise ApiError(500, f"the server's model cannot be used: {exc}", code="exception") from None
        finally:
            gen_lock.release()
        base = base_url(request, "/Patient/$synthesize")
        entries = []
        for b in bodies:
            head = orjson.loads(b)
            entries.append((f"{base}/{head['resourceType']}/{head['id']}", b, None))
        return fhir_response(bundle_bytes(btype="collection", total=None, links=[], entries=entries), 201)

