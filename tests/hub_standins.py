"""Local files in the column formats of the public sets, standing in for the hub in tests.

`write_standins(folder, rows)` writes each default source's set with `rows` rows (CLS sets get
`rows // 2 + 20` each) and returns the default `SourceSpec`s pointed at those files. Each set
also gets the faults named in `FAULTS`, so tests know exactly what curation must set aside.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sparcom.curation.sources import SourceSpec, default_sources

SYLLABLES = ["ka", "lo", "mi", "ter", "van", "sol", "dri", "pen", "qua", "rus", "bel", "tor", "ni", "gam",
             "zo", "fel", "ark", "mun", "sti", "pol", "ven", "yar", "cu", "dex"]
# per source: rows that curation must set aside, by stage
FAULTS = {
    "ag_news": {},
    "sst2": {"invalid": 1},            # an unlabelled row (label -1)
    "humaneval": {"duplicate": 1},     # the same prompt twice
    "trivia_qa": {"near duplicate": 1},
    "alpaca": {"invalid": 1},          # an empty output
    "math500": {},
    "cnn_dailymail": {"too long": 1},  # a 3,000-word article
}


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_standins(folder: Path, rows: int = 120, seed: int = 0) -> list[SourceSpec]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cls_rows = rows // 2 + 20
    ag_news = [{"text": words(rng, 25), "label": i % 4} for i in range(cls_rows)]
    sst2 = [{"idx": i, "sentence": words(rng, 15), "label": i % 2} for i in range(cls_rows)]
    sst2[3]["label"] = -1
    humaneval = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"{words(rng, 12)}\"\"\"\n",
                  "canonical_solution": "    return x\n", "test": "def check(f): pass",
                  "entry_point": f"f{i}"} for i in range(rows)]
    humaneval.append({**humaneval[5], "task_id": f"HumanEval/{rows}"})
    trivia = [{"question": words(rng, 14) + "?", "question_id": f"tq_{i}", "question_source": "web",
               "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
               "search_results": {"description": [], "filename": [], "rank": [], "title": [],
                                  "url": [], "search_context": []},
               "answer": {"aliases": ["x"], "normalized_aliases": ["x"], "matched_wiki_entity_name": "",
                          "normalized_matched_wiki_entity_name": "", "normalized_value": "x",
                          "type": "WikipediaEntity", "value": words(rng, 2).title()}}
              for i in range(rows)]
    near = trivia[7]["question"].split()
    near[-1] = "different?"
    trivia.append({**trivia[7], "question_id": f"tq_{rows}", "question": " ".join(near)})
    alpaca = [{"instruction": words(rng, 12), "input": words(rng, 8) if i % 3 == 0 else "",
               "output": words(rng, 30), "text": ""} for i in range(rows)]
    alpaca[10]["output"] = "   "
    math500 = [{"problem": f"Compute {words(rng, 10)} {i} + {i}.", "solution": f"It is \\boxed{{{2 * i}}}.",
                "answer": str(2 * i), "subject": "Algebra", "level": 1 + i % 5,
                "unique_id": f"test/algebra/{i}.json"} for i in range(rows)]
    cnn = [{"article": words(rng, 80), "highlights": words(rng, 15), "id": f"{i:040x}"} for i in range(rows)]
    cnn[2]["article"] = words(rng, 3000)
    files = {
        "ag_news": ("json", _jsonl(folder / "ag_news.jsonl", ag_news)),
        "sst2": ("parquet", _parquet(folder / "sst2.parquet", sst2)),
        "humaneval": ("json", _jsonl(folder / "humaneval.jsonl", humaneval)),
        "trivia_qa": ("parquet", _parquet(folder / "trivia_qa.parquet", trivia)),
        "alpaca": ("json", _jsonl(folder / "alpaca.jsonl", alpaca)),
        "math500": ("json", _jsonl(folder / "math500.jsonl", math500)),
        "cnn_dailymail": ("parquet", _parquet(folder / "cnn_dailymail.parquet", cnn)),
    }
    return [spec.model_copy(update={"dataset": files[spec.name][0], "data_files": files[spec.name][1],
                                    "config": None, "split": "train"})
            for spec in default_sources()]
