"""Responses kept for `previous_response_id` and GET / DELETE /v1/responses/{id}.

In memory, the `capacity` most recently used (created or continued), as OpenAI's `store`
(on unless a request says `store: false`). Each entry holds its response object, its own
input items and the response it continued; a conversation is rebuilt by walking those links,
so a long chain keeps each turn once. Used from the event loop only (no lock)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.api.protocol_responses import (
    ResponseFunctionCall,
    ResponseInputItem,
    ResponseInputMessage,
    ResponseReasoningItem,
)


@dataclass
class StoredResponse:
    response: dict[str, Any]
    """The response object as it was returned."""
    inputs: list[ResponseInputItem]
    """The request's own input items (after the conversation it continued)."""
    previous_id: str | None


def output_as_input(item: dict[str, Any]) -> ResponseInputItem:
    """A response's output item as the input item that feeds it back."""
    if item["type"] == "function_call":
        return ResponseFunctionCall(type="function_call", call_id=item["call_id"],
                                    name=item["name"], arguments=item["arguments"])
    if item["type"] == "reasoning":
        return ResponseReasoningItem(type="reasoning", content=item["content"])
    return ResponseInputMessage(type="message", role="assistant",
                                content="".join(part["text"] for part in item["content"]))


def input_item_body(item: ResponseInputItem, item_id: str) -> dict[str, Any]:
    """An input item as GET /v1/responses/{id}/input_items lists it (its id, or `item_id`
    where the request gave none)."""
    body = item.model_dump(exclude_none=True)
    body["id"] = item.id or item_id
    if isinstance(item, ResponseInputMessage):
        kind = "output_text" if item.role == "assistant" else "input_text"
        body["content"] = [{"type": kind, "text": item.content}]
    body.setdefault("status", "completed")
    return body


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict[str, Any], inputs: list[ResponseInputItem],
            previous_id: str | None) -> None:
        """Keep a finished response, dropping the least recently used beyond capacity."""
        self._entries[response["id"]] = StoredResponse(response, inputs, previous_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None

    def conversation(self, response_id: str) -> list[ResponseInputItem] | None:
        """Every input and output item of the chain of responses ending with this one,
        oldest first (its instructions are not carried over); None if a link is gone.
        The chain's entries count as used."""
        chain: list[StoredResponse] = []
        next_id: str | None = response_id
        while next_id is not None:
            entry = self._entries.get(next_id)
            if entry is None:
                return None
            self._entries.move_to_end(next_id)
            chain.append(entry)
            next_id = entry.previous_id
        items: list[ResponseInputItem] = []
        for entry in reversed(chain):
            items += entry.inputs
            items += [output_as_input(item) for item in entry.response["output"]]
        return items
