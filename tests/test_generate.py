"""The meta-prompt generator with a stub chat function: good replies become records, bad ones
are rejected with their reasons, and the run is reproducible."""

from __future__ import annotations

import json

import pytest

from sparcom.curation.generate import GenerationRejected, generate_records, meta_prompt, parse_generation
from sparcom.curation.hexainst import authored_records


def reply(instruction="How many legs does a spider have?", input="", response="Eight.", fenced=False):
    text = json.dumps({"instruction": instruction, "input": input, "response": response})
    return f"Sure! Here it is:\n```json\n{text}\n```" if fenced else text


class Stub:
    """Answers the meta-prompts in turn from a script, and remembers what it was asked."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def __call__(self, messages):
        self.prompts.append(messages[0]["content"])
        return self.replies.pop(0)


@pytest.mark.parametrize("text,category,reason", [
    ("I cannot help with that.", "QA", "holds no JSON object"),
    ('{"instruction": "Why?", "response": ', "QA", "holds no JSON object"),
    ('{"instruction": "Why?" "response": "x"}', "QA", "JSON is not valid"),
    (reply(response=""), "QA", "'response' is missing or empty"),
    (json.dumps({"instruction": ["a"], "response": "b"}), "QA", "'instruction' is a list"),
    (reply(instruction="Summarize."), "SUM", "a SUM record needs an input"),
    (reply(instruction="What is 2 + 2?", response="4"), "MATH", "must end with a line 'Answer: ...'"),
    (reply(instruction="Write add.", response="```python\ndef add(a, b)\n    return a + b\n```"), "CODE",
     "code does not compile"),
    (reply(instruction="Echo", response="echo!"), "QA", "repeats the instruction"),
])
def test_bad_replies_are_rejected_with_reasons(text, category, reason):
    with pytest.raises(GenerationRejected, match=reason):
        parse_generation(text, category)


def test_good_replies_parse_including_fenced_json():
    assert parse_generation(reply(fenced=True), "QA")["response"] == "Eight."
    math = parse_generation(reply(instruction="What is 6 x 7?", response="6 x 7 = 42.\nAnswer: 42"), "MATH")
    assert math["response"].endswith("Answer: 42")
    code = reply(instruction="Write add.", response="```python\ndef add(a, b):\n    return a + b\n```")
    assert "def add" in parse_generation(code, "CODE")["response"]


def test_generation_keeps_valid_records_and_reports_every_rejection():
    existing = authored_records(("QA",))
    stub = Stub([
        reply(),                                                       # good
        "no JSON here",                                                # rejected
        reply(instruction=existing[0].instruction, response="Au."),   # duplicate of a shipped record
        reply(),                                                       # duplicate of the first
        reply(instruction="Which ocean is the largest?", response="The Pacific.", fenced=True),
    ])
    result = generate_records(stub, "QA", count=2, seed=3, existing=existing, license="CC0-1.0")
    assert [r.instruction for r in result.records] == ["How many legs does a spider have?", "Which ocean is the largest?"]
    assert all(r.origin == "ai" and r.category == "QA" and r.license == "CC0-1.0" for r in result.records)
    assert all(r.id.startswith("gen-qa-") for r in result.records) and len({r.id for r in result.records}) == 2
    first_id = result.records[0].id
    assert [r["reason"] for r in result.rejected] == [
        "the reply holds no JSON object", "an exact duplicate of 'ai-qa-001'",
        f"an exact duplicate of {first_id!r}"]
    assert all("Reply with only a JSON object" in p and "Topic: " in p for p in stub.prompts)
    again = generate_records(Stub([reply()]), "QA", count=1, seed=3)
    assert again.records[0].id == result.records[0].id  # ids follow content


def test_copies_of_the_example_are_rejected():
    example = authored_records(("SUM",))[0]
    edited = example.input.replace("two hours later", "three hours later")
    stub = Stub([reply(instruction=example.instruction, input=edited, response=example.response),
                 reply(instruction=example.instruction.upper() + "!", input=example.input, response="x")])
    result = generate_records(stub, "SUM", count=1, examples=[example], max_attempts=2)
    assert result.records == []
    reasons = [r["reason"] for r in result.rejected]
    assert reasons[0].startswith("a near (Jaccard 0.9") and reasons[0].endswith(f"duplicate of {example.id!r}")
    assert reasons[1] == f"an exact duplicate of {example.id!r}"


def test_attempts_are_bounded_and_prompts_follow_the_seed():
    def first_prompts(seed):
        stub = Stub(["nothing"] * 6)
        result = generate_records(stub, "GEN", count=2, seed=seed)
        assert result.records == [] and len(result.rejected) == 6
        return stub.prompts

    assert first_prompts(1) == first_prompts(1) != first_prompts(2)
    example = authored_records(("SUM",))[0]
    assert example.input in meta_prompt("SUM", "hiking", example).replace("\\n", "\n")
    with pytest.raises(ValueError, match="unknown category 'POEM'"):
        generate_records(Stub([]), "POEM", count=1)
