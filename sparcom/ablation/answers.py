"""Checkable answers: which records have an answer a generation can be checked against, and
whether a generation gives it (docs/method.md section 6, accuracy).

- `CHECKS`: the categories with a checkable answer and what it is: CLS, the label (the
  response's first sentence, a single line of at most `MAX_LABEL_WORDS` words); MATH, the final
  number (the `\\boxed{}` content, else the text after the last "Answer:", else the last line,
  when that is one number, optionally after `name =` and before a unit: "$38.50", "x = 7",
  "13 cm", "5/36", "1 7/12"). Every other category, and a record of CLS or MATH whose answer is
  not of that form, has none.
- `reference_answer(record)`: that answer as text (the label lower-cased, "negative"; the number
  as a fraction, "77/2"), or None.
- `is_correct(record, generation)`: CLS: the generation's first line, without markup and an
  "Answer:"-like lead, begins with the label (case-insensitive, whole words), not followed by
  more options (", ...", "or ..."); MATH: the first number
  after the generation's last answer marker (`\\boxed{}`, "Answer:", "answer is"), else its last
  number, equals the reference as a fraction.
- `numbers(text)`: the numbers of a text as exact fractions, normalised: digit-group commas,
  currency signs, a trailing ".0", the Unicode minus, "a/b", mixed "1 7/12", and simple LaTeX
  (`\\frac{a}{b}`, `\\text{}`, `\\$`, `\\%`, `^\\circ`, `{,}`).

    reference_answer(record)  # 'negative' for a CLS record answered "Negative. The battery died..."
    is_correct(record, "**Negative** - the customer is unhappy")  # True
"""

from __future__ import annotations

import re
from fractions import Fraction

from sparcom.curation.records import InstructionRecord

MAX_LABEL_WORDS = 4
CHECKS = {"CLS": "the label (a short first sentence)", "MATH": "the final number"}

# A number not inside a word ("12x", "a_1", "x²" are none), optionally signed and after a currency sign.
_NUMBER = re.compile(
    r"(?<![\w./])(?P<sign>[-−]?)[$€£]?(?:"
    r"(?P<whole>\d+)[ \t]+(?P<num>\d+)[ \t]*/[ \t]*(?P<den>\d+)"    # mixed: 1 7/12
    r"|(?P<fnum>\d+)[ \t]*/[ \t]*(?P<fden>\d+)"                        # fraction: 5/36
    r"|(?P<decimal>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"  # 6,348.67 or 38.50
    r")(?![\w.]*\d)(?!\w)")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX = [(re.compile(pattern), plain) for pattern, plain in (
    (r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1"), (r"\\([$%])", r"\1"), (r"\^\{?\\circ\}?", "°"),
    (r"\{,\}", ","), (r"\\[,!; ]", ""), (r"\\(?:left|right)\b", ""))]
_UNIT = r"(?:%|°|[^\W\d_][^\W\d_²³/.]*(?:/[^\W\d_]+)?[²³]?)"
# "name =" before the number, a unit (words, %, °, m/s, cm²) after it, nothing else.
_SINGLE_NUMBER = re.compile(rf"(?:[^\W\d]\w*\s*=\s*)?(?P<number>.+?)(?:\s*{_UNIT})*\s*\.?")
_ANSWER_MARKER = re.compile(r"answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_LEAD = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:answer|label|category|class|classification)\s*(?:is|:|-)\s*",
                   re.IGNORECASE)
_SHORT_LEAD = re.compile(r"^[^\W\d][\w ]{0,30}:\s*")
_MARKUP = re.compile(r"[*_`#>\"“”]")
# After the label, the options listed on: "Sports, politics or health" repeats the question.
_LIST_GOES_ON = re.compile(r"\s*(?:[,/|]|or\b|and\b)")


def _latex_plain(text: str) -> str:
    """LaTeX of simple answers as plain text: fractions a/b, \\text{} content, escaped $ and %,
    degrees, thin spaces and the {,} digit-group comma."""
    for latex, plain in _LATEX:
        text = latex.sub(plain, text)
    return _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)


def numbers(text: str) -> list[Fraction]:
    found = []
    for match in _NUMBER.finditer(_latex_plain(text)):
        if match["decimal"] is not None:
            value = Fraction(match["decimal"].replace(",", ""))
        else:
            whole, numerator, denominator = (int(match[k] or 0) for k in ("whole", "num", "den")) \
                if match["whole"] is not None else (0, int(match["fnum"]), int(match["fden"]))
            if denominator == 0:
                continue
            value = whole + Fraction(numerator, denominator)
        found.append(-value if match["sign"] else value)
    return found


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth < 0:
            return text[begin:index]
    return None


def _answer_text(response: str) -> str:
    content = _boxed(response)
    if content is not None:
        return content
    markers = list(_ANSWER_MARKER.finditer(response))
    if markers:
        after = response[markers[-1].end():].strip()
        return after.splitlines()[0] if after else ""
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _reference_number(response: str) -> Fraction | None:
    """The final number of a MATH reference, when its answer is one number (with name and unit)."""
    answer = _SINGLE_NUMBER.fullmatch(_latex_plain(_answer_text(response)).strip())
    if not answer or not _NUMBER.fullmatch(answer["number"].strip()):
        return None
    return numbers(answer["number"])[0] if numbers(answer["number"]) else None


def _predicted_number(generation: str) -> Fraction | None:
    content = _boxed(generation)
    markers = list(_ANSWER_MARKER.finditer(generation))
    if content is not None:
        found = numbers(content)
    elif markers:
        found = numbers(generation[markers[-1].end():])[:1]
    else:
        found = numbers(generation)[-1:]
    return found[0] if found else None


def _normalised(text: str) -> str:
    return " ".join(_MARKUP.sub("", text).casefold().split()).strip(" .,;:!?-()[]'")


def _reference_label(response: str) -> str | None:
    text = response.strip()
    if not text or "\n" in text:
        return None
    label = _normalised(re.split(r"(?<=\w)[.!?](?:\s|$)", text, maxsplit=1)[0])
    return label if label and len(label.split()) <= MAX_LABEL_WORDS else None


def _predicted_labels(generation: str) -> list[str]:
    """The generation's first non-empty line, normalised, without an 'Answer:'-like lead; and
    also without any short lead before a colon ("Sentiment: Negative")."""
    lines = [line for line in _MARKUP.sub("", generation).splitlines() if line.strip()]
    if not lines:
        return [""]
    line = _LEAD.sub("", lines[0].strip())
    lead = _SHORT_LEAD.match(line)
    return [_normalised(line)] + ([_normalised(line[lead.end():])] if lead else [])


def reference_answer(record: InstructionRecord) -> str | None:
    if record.category == "CLS":
        return _reference_label(record.response)
    if record.category == "MATH":
        number = _reference_number(record.response)
        return None if number is None else str(number)
    return None


def is_correct(record: InstructionRecord, generation: str) -> bool:
    """Whether `generation` gives the record's checkable answer; a record without one is an error."""
    reference = reference_answer(record)
    if reference is None:
        raise ValueError(f"record {record.id} ({record.category}): no checkable answer")
    if record.category == "CLS":
        return any(predicted == reference
                   or (predicted.startswith(reference) and not predicted[len(reference)].isalnum()
                       and not _LIST_GOES_ON.match(predicted[len(reference):]))
                   for predicted in _predicted_labels(generation))
    return _predicted_number(generation) == Fraction(reference)
