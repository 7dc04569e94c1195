"""Stored responses (`store: true`): what GET /v1/responses/{id} returns and `previous_response_id` continues.

Each entry holds the response as sent and the conversation it answered (its input items, the history
of any response it continued included, instructions excluded as OpenAI does), so that an entry is
whole by itself: evicting one never breaks another's chain. Bounded by entries and by bytes (the
JSON as held), least recently used out first; reading an entry (GET, or continuing it) counts as a use.
The store lives in the API process, in memory: every model-server replica behind it can continue any
stored conversation, and it is gone when the process restarts.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

from app.errors import NotFound

log = logging.getLogger("app.responses")


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()  # id -> (response, conversation) JSON

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, conversation: list[dict]) -> None:
        entry = (json.dumps(response).encode(), json.dumps(conversation).encode())
        size = len(entry[0]) + len(entry[1])
        if size > self.max_bytes or self.max_entries == 0:
            log.warning("response %s (%d bytes) not stored: over RESPONSES_STORE_MAX_BYTES (%d) or the store is off",
                        response["id"], size, self.max_bytes)
            return
        self._drop(response["id"])
        self._entries[response["id"]] = entry
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def response(self, response_id: str, param: str | None = None) -> bytes:
        """The stored response's JSON, or a 404 naming the id."""
        return self._get(response_id, param)[0]

    def continuation(self, response_id: str, param: str | None = None) -> list[dict]:
        """The conversation a response continuing this one starts from: its input items, then its output."""
        response, conversation = self._get(response_id, param)
        return json.loads(conversation) + json.loads(response)["output"]

    def delete(self, response_id: str) -> None:
        self._get(response_id, "response_id")
        self._drop(response_id)

    def _get(self, response_id: str, param: str | None) -> tuple[bytes, bytes]:
        entry = self._entries.get(response_id)
        if entry is None:
            raise NotFound(f"No response with id '{response_id}' is stored here: it was created with store: false, "
                           "deleted, or evicted from the bounded store (RESPONSES_STORE_MAX_ENTRIES, "
                           "RESPONSES_STORE_MAX_BYTES).", param=param)
        self._entries.move_to_end(response_id)
        return entry

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= len(entry[0]) + len(entry[1])
