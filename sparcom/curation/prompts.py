"""What the model reads for each instruction, and which of its tokens are counted (docs/method.md section 2).

- `tokenize_instruction(record, tokenizer, span)`: token ids plus a per-token "counted" flag.
  prompt:   the chat-templated prompt with the generation prompt, every token counted;
  content:  the same tokens, counting only those inside the user's text;
  response: the prompt followed by the reference response, counting only the response tokens.
- `prompt_ids(record, tokenizer)`: the chat-templated prompt's ids, as every stage feeds them.
- `token_ids(encoded)`: the ids of an `apply_chat_template` result, in any transformers version.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sparcom.curation.records import InstructionRecord


@dataclass(frozen=True)
class TokenizedInstruction:
    input_ids: tuple[int, ...]
    counted: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_text(record: InstructionRecord, tokenizer: PreTrainedTokenizerBase) -> str:
    if tokenizer.chat_template is None:
        return record.user_turn()
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": record.user_turn()}], add_generation_prompt=True, tokenize=False)


def prompt_ids(record: InstructionRecord, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if tokenizer.chat_template is None:
        return tokenizer(record.user_turn())["input_ids"]
    return token_ids(tokenizer.apply_chat_template(
        [{"role": "user", "content": record.user_turn()}], add_generation_prompt=True))


def token_ids(encoded) -> list[int]:
    """The ids of an `apply_chat_template` result: a mapping in transformers 5, a list before."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_instruction(
    record: InstructionRecord, tokenizer: PreTrainedTokenizerBase, span: str
) -> TokenizedInstruction:
    ids = prompt_ids(record, tokenizer)
    if span == "prompt":
        return TokenizedInstruction(tuple(ids), (True,) * len(ids))
    if span == "response":
        response = tokenizer(record.response, add_special_tokens=False)["input_ids"]
        return TokenizedInstruction(tuple(ids + response), (False,) * len(ids) + (True,) * len(response))
    if span == "content":
        return _content_tokens(record, tokenizer, ids)
    raise ValueError(f"unknown token span {span!r}; expected prompt, content or response")


def _content_tokens(
    record: InstructionRecord, tokenizer: PreTrainedTokenizerBase, ids: list[int]
) -> TokenizedInstruction:
    text = prompt_text(record, tokenizer)
    content = record.user_turn()
    start = text.rfind(content)
    if start < 0:
        raise ValueError(f"record {record.id}: the chat template does not contain the user text verbatim")
    end = start + len(content)
    with_special = tokenizer.chat_template is None
    encoded = tokenizer(text, add_special_tokens=with_special, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        raise ValueError(f"record {record.id}: re-tokenizing the rendered prompt changed its tokens")
    counted = tuple(start <= a and b <= end and b > a for a, b in encoded["offset_mapping"])
    return TokenizedInstruction(tuple(ids), counted)
