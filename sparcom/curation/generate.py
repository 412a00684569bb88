"""New AI-written HexaInst records from any chat model, through constrained meta-prompts.

- `meta_prompt(category, topic, example)`: the request: one new instruction of the category on
  the topic, answered, returned as a JSON object, with one shipped record as the example.
- `parse_generation(text, category)`: the record fields from a model's reply, or a
  `GenerationRejected` saying what is wrong with it.
- `generate_records(chat, category, count, seed, existing)`: asks until `count` replies pass
  (or the attempts run out); every rejected reply is kept with its reason.
- `transformers_chat(loaded, max_new_tokens, temperature, seed)`: a `chat` function over a
  model loaded with `sparcom.core.models.load_model`.

The checks are what can be checked without a judge: the JSON shape, non-empty fields, an input
where the category needs one, a final "Answer:" line for MATH, code blocks that compile (never
run) for CODE, and no exact or near duplicate of an existing, example or earlier record. Generated records still
deserve the hand check the paper gave its own.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sparcom.core.hashing import content_hash
from sparcom.curation.dedup import canonical_text, jaccard, shingles
from sparcom.curation.records import InstructionRecord, record_problem

ChatFunction = Callable[[list[dict[str, str]]], str]

TASKS = {
    "CLS": "a classification task: the user gives a short text (in the input) and asks for one label "
           "from a small set of labels named in the instruction; the response is the label",
    "CODE": "a programming task: writing, explaining, fixing or reviewing code; put any given code in "
            "the input; code in the response goes in a fenced ```python block and must be correct",
    "QA": "a factual general-knowledge question with one clear, correct answer, answered briefly",
    "GEN": "an open-ended writing request (a poem, story, letter, slogan, list of ideas...) answered well",
    "MATH": "a math word problem or exercise with one exact answer; the response works it out step by "
            "step and ends with a final line 'Answer: <answer>'",
    "SUM": "a summarization request: the input is a passage of 80 to 200 words written by you; the "
           "response summarizes it faithfully",
}
NEEDS_INPUT = ("SUM",)
TOPICS = (
    "cooking", "personal finance", "astronomy", "public transport", "gardening", "music history",
    "sports", "software teams", "medicine", "climate", "travel", "school life", "small business",
    "animals", "architecture", "film", "chemistry", "local news", "hiking", "online shopping",
)
NEAR_DUPLICATE = 0.8  # the curation default: what curation would drop is not worth keeping
CODE_BLOCK = re.compile(r"```(?:python|py)\s*\n(.*?)```", re.DOTALL)


class GenerationRejected(ValueError):
    """A model reply that does not make a valid record; the message is the reason."""


@dataclass
class GenerationResult:
    records: list[InstructionRecord] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"topic", "reply", "reason"}


def meta_prompt(category: str, topic: str, example: InstructionRecord) -> str:
    shown = {"instruction": example.instruction, "input": example.input, "response": example.response}
    return (
        f"Write one new instruction for an AI assistant: {TASKS[category]}.\n"
        f"Topic: {topic}. Make it original and realistic, phrased the way a person would ask.\n"
        "Reply with only a JSON object with the keys \"instruction\", \"input\" (an empty string "
        "if the instruction needs no extra text) and \"response\" (a correct reference answer).\n"
        f"Example of the format:\n{json.dumps(shown, ensure_ascii=False)}"
    )


def parse_generation(text: str, category: str) -> dict[str, str]:
    data = _json_object(text)
    fields = {}
    for key in ("instruction", "input", "response"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise GenerationRejected(f"'{key}' is a {type(value).__name__}, not a string")
        fields[key] = value.strip()
    for key in ("instruction", "response"):
        if not fields[key]:
            raise GenerationRejected(f"'{key}' is missing or empty")
    if category in NEEDS_INPUT and not fields["input"]:
        raise GenerationRejected(f"a {category} record needs an input")
    if canonical_text(fields["response"]) == canonical_text(fields["instruction"]):
        raise GenerationRejected("the response repeats the instruction")
    if category == "MATH" and not re.search(r"^Answer:\s*\S", fields["response"], re.MULTILINE):
        raise GenerationRejected("a MATH response must end with a line 'Answer: ...'")
    if category == "CODE":
        for block in CODE_BLOCK.findall(fields["response"]):
            try:
                ast.parse(block)
            except SyntaxError as error:
                raise GenerationRejected(f"the response's code does not compile: {error.msg} "
                                         f"(line {error.lineno})") from None
    return fields


def _json_object(text: str) -> dict:
    fenced = re.search(r"```(?:json)?\s*\n(.*?)```", text, re.DOTALL)
    candidate = fenced.group(1) if fenced else text
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0 or end <= start:
        raise GenerationRejected("the reply holds no JSON object")
    try:
        data = json.loads(candidate[start:end + 1])
    except json.JSONDecodeError as error:
        raise GenerationRejected(f"the reply's JSON is not valid ({error.msg})") from None
    if not isinstance(data, dict):
        raise GenerationRejected("the reply's JSON is not an object")
    return data


def generate_records(
    chat: ChatFunction,
    category: str,
    count: int,
    seed: int = 0,
    existing: Sequence[InstructionRecord] = (),
    examples: Sequence[InstructionRecord] = (),
    source: str = "generated",
    license: str = "other",
    max_attempts: int | None = None,
) -> GenerationResult:
    """Records with ids `gen-<category>-<content hash>`, so reruns and merges cannot collide."""
    if category not in TASKS:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(TASKS)}")
    examples = [r for r in examples if r.category == category] or _shipped_examples(category)
    rng = random.Random(seed)
    # The examples count as existing: a small model's commonest failure is to copy the example.
    seen = {r.id: shingles(r.user_turn()) for r in [*existing, *examples]}
    result = GenerationResult()
    for _ in range(max_attempts or 3 * count):
        if len(result.records) == count:
            break
        topic = rng.choice(TOPICS)
        reply = chat([{"role": "user", "content": meta_prompt(category, topic, rng.choice(examples))}])
        try:
            record = _record(parse_generation(reply, category), category, source, license)
            _check_new(shingles(record.user_turn()), seen)
        except GenerationRejected as error:
            result.rejected.append({"topic": topic, "reply": reply, "reason": str(error)})
            continue
        seen[record.id] = shingles(record.user_turn())
        result.records.append(record)
    return result


def _check_new(candidate: frozenset[str], seen: dict[str, frozenset[str]]) -> None:
    for record_id, known in seen.items():
        similarity = jaccard(candidate, known)
        if similarity >= NEAR_DUPLICATE:
            kind = "an exact" if candidate == known else f"a near (Jaccard {similarity:.2f})"
            raise GenerationRejected(f"{kind} duplicate of {record_id!r}")


def _shipped_examples(category: str) -> list[InstructionRecord]:
    from sparcom.curation.hexainst import authored_records

    return authored_records((category,))


def _record(fields: dict[str, str], category: str, source: str, license: str) -> InstructionRecord:
    digest = content_hash(fields)[:12]
    record, problem = record_problem({"id": f"gen-{category.lower()}-{digest}", "category": category,
                                      "origin": "ai", "source": source, "license": license, **fields})
    if record is None:
        raise GenerationRejected(problem)
    return record


def transformers_chat(loaded, max_new_tokens: int = 512, temperature: float = 0.8, seed: int = 0) -> ChatFunction:
    """Sampling with a fixed torch seed: the same model and settings give the same replies."""
    import torch

    generator_seed = [seed]

    def chat(messages: list[dict[str, str]]) -> str:
        tokenizer, model = loaded.tokenizer, loaded.model
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True).to(loaded.device)
        torch.manual_seed(generator_seed[0])
        generator_seed[0] += 1
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat
