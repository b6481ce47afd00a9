"""Reasoning output (``--reasoning-parser``, vLLM's parsers): a choice's text split into the
model's reasoning and its answer, whole and streamed, before tool calls are read from the answer
(vLLM's order). The message carries ``reasoning`` (vLLM's field name) beside ``content``."""

from __future__ import annotations

from dataclasses import dataclass


def check_reasoning_parser(name: str) -> None:
    """Refuse an unknown --reasoning-parser at start, listing vLLM's."""
    from vllm.reasoning import ReasoningParserManager

    known = ReasoningParserManager.list_registered()
    if name not in known:
        raise ValueError(f"--reasoning-parser {name!r} is not one of vLLM's reasoning parsers: "
                         f"{', '.join(sorted(known))}")


def _request():
    # the parsers' signature takes vLLM's request; the text parsers do not read it
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": ""}]})


@dataclass
class ReasoningReader:
    """One request's reading of reasoning (a parser per choice: they keep stream state)."""

    name: str
    tokenizer: object

    def _parser(self):
        from vllm.reasoning import ReasoningParserManager

        return ReasoningParserManager.get_reasoning_parser(self.name)(self.tokenizer)

    def whole(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of a finished choice; all answer when the text has no reasoning."""
        reasoning, content = self._parser().extract_reasoning(text, _request())
        return reasoning, content or ""

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self._parser())


class ReasoningStream:
    def __init__(self, parser):
        self.parser = parser
        self.text = ""
        self.ids: list[int] = []

    def delta(self, text: str, token_ids: list[int]) -> tuple[str, str]:
        """(reasoning delta, answer delta) for the next piece of the choice."""
        prev_text, prev_ids = self.text, self.ids
        self.text, self.ids = prev_text + text, prev_ids + list(token_ids)
        msg = self.parser.extract_reasoning_streaming(prev_text, self.text, text, prev_ids, self.ids,
                                                      list(token_ids))
        if msg is None:
            return "", ""
        return msg.reasoning or "", msg.content or ""
