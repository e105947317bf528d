"""Opaque paging cursors: a position (sort key, rid) in a snapshot of the store, base64url-encoded JSON."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson

from fhirsynth.store.query import SearchError


@dataclass(frozen=True)
class Cursor:
    direction: str  # "next": rows after (key, rid); "prev": rows before it
    key: object
    rid: int
    snapshot: int

    def encode(self) -> str:
        raw = orjson.dumps([self.direction[0], self.key, self.rid, self.snapshot])
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            d, key, rid, snap = orjson.loads(raw)
            if d not in ("n", "p") or not isinstance(rid, int) or not isinstance(snap, int):
                raise ValueError
        except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
            raise SearchError("invalid or expired paging cursor", param="_cursor") from None
        return cls("next" if d == "n" else "prev", key, rid, snap)
