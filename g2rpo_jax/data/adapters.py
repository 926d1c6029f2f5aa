"""Adapters: one raw dataset record (a dict) -> `Example`, or None when the record is unusable.

Each adapter knows one family of field names (checked against the public files in
../shared/data and the Hugging Face dataset cards). A record missing a required field raises a
ValueError naming the adapter and the field; a record that is well formed but cannot serve
(e.g. an OpenR1 problem without any verified-correct trace) returns None and is counted by the
loader.
"""

from __future__ import annotations

import ast
import json
import random
import re
import warnings
import zlib
from typing import Any, Callable, Mapping

from g2rpo_jax.data.example import Example
# One definition of "the final answer" for data and rewards: the last balanced \boxed{...}.
from g2rpo_jax.task_format import last_boxed as last_boxed_answer

Record = Mapping[str, Any]
Adapter = Callable[[Record], "Example | None"]

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<3*4=12>>" markup
_LEVEL_NUMBER = re.compile(r"(\d+)")


# ----------------------------------------------------------------------------- helpers

def _require(record: Record, field: str, adapter: str) -> Any:
    if field not in record or record[field] is None:
        raise ValueError(
            f"adapter {adapter!r}: record has no field {field!r}; its fields are {sorted(record)}"
        )
    return record[field]


def _first_present(record: Record, fields: tuple[str, ...], adapter: str) -> Any:
    for field in fields:
        if record.get(field) not in (None, ""):
            return record[field]
    raise ValueError(
        f"adapter {adapter!r}: record has none of the fields {fields}; its fields are {sorted(record)}"
    )


def _maybe_json(value: Any) -> Any:
    """Several hub datasets store nested structures as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _record_id(record: Record, fields: tuple[str, ...]) -> str:
    for field in fields:
        if record.get(field) not in (None, ""):
            return str(record[field])
    return ""  # the loader fills in "<source>/<row>"


def _prefixed_id(prefix: str, record: Record, fields: tuple[str, ...]) -> str:
    """Bare row numbers ('60') are only unique within one file, so they get the source name."""
    raw = _record_id(record, fields)
    return f"{prefix}/{raw}" if raw else ""


def _normalize_integer(answer: str) -> str:
    """'025' -> '25' and '1,000' -> '1000'; anything that is not a plain integer is kept as is."""
    stripped = answer.strip()
    digits = stripped.replace(",", "")
    if re.fullmatch(r"[+-]?\d+", digits):
        return str(int(digits))
    return stripped


def _level(value: Any) -> float | None:
    """MATH levels come as 3 or 'Level 3' (and occasionally 'Level ?')."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _LEVEL_NUMBER.search(str(value or ""))
    return float(match.group(1)) if match else None


def _fenced_code_body(text: str) -> str:
    """Strips one surrounding ```python ... ``` fence if the whole text is fenced."""
    stripped = text.strip()
    match = re.fullmatch(r"```[\w+-]*\n(.*?)\n?```", stripped, flags=re.DOTALL)
    return match.group(1) if match else text


# ----------------------------------------------------------------------------- math

def from_openr1_math(record: Record) -> Example | None:
    """OpenR1-Math-220k: the first generation marked correct by math-verify is the trajectory."""
    name = "openr1_math"
    problem = _require(record, "problem", name)
    generations = list(_require(record, "generations", name))
    verified = list(_require(record, "correctness_math_verify", name))
    if len(verified) != len(generations):
        raise ValueError(
            f"adapter {name!r}: {len(generations)} generations but {len(verified)} "
            "correctness_math_verify flags"
        )
    # is_reasoning_complete (when present) rules out traces cut off before </think>.
    complete = list(record.get("is_reasoning_complete") or [True] * len(generations))
    chosen = next(
        (i for i, (ok, done) in enumerate(zip(verified, complete)) if ok and done), None
    )
    if chosen is None:
        return None
    answer = record.get("answer") or last_boxed_answer(record.get("solution") or "")
    if not answer:
        return None
    return Example(
        id=_record_id(record, ("uuid", "id")),
        prompt=problem,
        answer=str(answer),
        trajectory=generations[chosen],
        source=str(record.get("source") or "openr1_math"),
        metadata={
            "generation_index": chosen,
            "problem_type": record.get("problem_type"),
            "question_type": record.get("question_type"),
        },
    )


def from_math(record: Record) -> Example | None:
    """MATH / MATH500: the worked solution is the trajectory; answer field, else the last box."""
    name = "math"
    problem = _require(record, "problem", name)
    solution = _require(record, "solution", name)
    answer = record.get("answer")
    if answer in (None, ""):
        answer = last_boxed_answer(solution)
    if answer in (None, ""):
        raise ValueError(
            f"adapter {name!r}: record {_record_id(record, ('unique_id', 'idx'))!r} has no 'answer' "
            "and its solution has no complete \\boxed{...}"
        )
    metadata = {
        key: record[key] for key in ("subject", "type", "level", "unique_id", "idx") if key in record
    }
    return Example(
        id=_record_id(record, ("unique_id",)) or _prefixed_id("math", record, ("idx", "id")),
        prompt=problem,
        answer=str(answer),
        trajectory=solution,
        source="math",
        difficulty=_level(record.get("level")),
        metadata=metadata,
    )


def from_gsm8k(record: Record) -> Example | None:
    """GSM8K: 'reasoning ... #### 42'. The trajectory is the reasoning without calculator markup,
    closed with the boxed answer so that a fully guided rollout satisfies the math instruction."""
    name = "gsm8k"
    question = _require(record, "question", name)
    full_answer = _require(record, "answer", name)
    if "####" not in full_answer:
        raise ValueError(f"adapter {name!r}: answer field has no '#### <number>' line: {full_answer!r:.80}")
    reasoning, _, final = full_answer.rpartition("####")
    answer = _normalize_integer(final)
    reasoning = _CALCULATOR_ANNOTATION.sub("", reasoning).strip()
    trajectory = f"{reasoning}\nThe final answer is $\\boxed{{{answer}}}$."
    return Example(
        id=_record_id(record, ("id",)),
        prompt=question,
        answer=answer,
        trajectory=trajectory,
        source="gsm8k",
    )


def from_aime(record: Record) -> Example | None:
    """AIME files (Qwen2.5-Math / math-evaluation-harness / rllm styles).

    Fields: `problem` (or `question`), `answer` (zero-padded strings like '025' are normalized),
    and an optional `solution`. Some AIME25 copies put the bare answer in `solution`; that is not
    a trajectory, so the trajectory is empty then (as it is when there is no solution at all).
    """
    name = "aime"
    problem = _first_present(record, ("problem", "question"), name)
    answer = _normalize_integer(str(_require(record, "answer", name)))
    solution = str(record.get("solution") or "")
    if _normalize_integer(solution) == answer:
        solution = ""
    metadata = {
        key: record[key]
        for key in ("url", "year", "aime_number", "problem_number", "difficulty")
        if key in record
    }
    difficulty = record.get("difficulty")
    return Example(
        id=_prefixed_id("aime", record, ("id",)) or _record_id(record, ("url",)),
        prompt=problem,
        answer=answer,
        trajectory=solution,
        source="aime",
        difficulty=float(difficulty) if isinstance(difficulty, (int, float)) else None,
        metadata=metadata,
    )


# ----------------------------------------------------------------------------- multiple choice

CHOICE_LETTERS = "ABCDEFGHIJ"
_GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def _choice_list(value: Any, adapter: str) -> list[str]:
    """Options as a list of texts; a {letter: text} mapping is read in letter order."""
    value = _maybe_json(value)
    if isinstance(value, Mapping):
        value = [value[key] for key in sorted(value)]
    if not isinstance(value, list) or not 2 <= len(value) <= len(CHOICE_LETTERS):
        raise ValueError(f"adapter {adapter!r}: choices must be a list of 2 to {len(CHOICE_LETTERS)} "
                         f"options, got {value!r:.80}")
    return [str(option).strip() for option in value]


def _correct_index(answer: Any, options: list[str], adapter: str) -> int:
    """The correct option from a letter ('C', '(C)'), a 0-based index, or the option's own text."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    text = str(answer).strip()
    letter = text.strip("()").upper()
    if len(letter) == 1 and letter in CHOICE_LETTERS[: len(options)]:
        return CHOICE_LETTERS.index(letter)
    if text in options:
        return options.index(text)
    raise ValueError(f"adapter {adapter!r}: answer {answer!r} is neither a letter in "
                     f"{CHOICE_LETTERS[: len(options)]!r}, an index below {len(options)} nor one of the options")


def from_multiple_choice(record: Record) -> Example | None:
    """Multiple-choice questions, GPQA style. The prompt lists the options as 'A) ...', 'B) ...';
    the answer is the correct letter, which the math reward checks in the final \\boxed{}.

    GPQA's own fields (`Question`, `Correct Answer`, `Incorrect Answer 1..3`, `Explanation`,
    `Record ID`) put the correct answer first, so the options are shuffled with a seed taken from
    the question: the same order on every run and machine. Otherwise `question` (or `problem`),
    `choices` (or `options`: a list, or a mapping letter -> text) in the given order, and
    `answer`: a letter, a 0-based index or the text of the correct option.
    """
    name = "multiple_choice"
    if "Correct Answer" in record:
        question = str(_require(record, "Question", name)).strip()
        correct = str(record["Correct Answer"]).strip()
        options = [correct] + [str(record[k]).strip() for k in _GPQA_WRONG if record.get(k) not in (None, "")]
        random.Random(zlib.crc32(question.encode("utf-8"))).shuffle(options)
        index = options.index(correct)
    else:
        question = str(_first_present(record, ("question", "problem"), name)).strip()
        options = _choice_list(_first_present(record, ("choices", "options"), name), name)
        index = _correct_index(_require(record, "answer", name), options, name)
    listing = "\n".join(f"{CHOICE_LETTERS[i]}) {option}" for i, option in enumerate(options))
    return Example(
        id=_record_id(record, ("Record ID", "id", "question_id")),
        prompt=f"{question}\n\n{listing}\n\nThe final answer is the letter of the correct option.",
        answer=CHOICE_LETTERS[index],
        trajectory=str(record.get("Explanation") or record.get("explanation") or ""),
        source=str(record.get("source") or "multiple_choice"),
        metadata={"num_options": len(options)},
    )


# ----------------------------------------------------------------------------- code

def from_humaneval(record: Record) -> Example | None:
    """HumanEval: complete a function. Trajectory = signature/docstring + canonical body."""
    name = "humaneval"
    code_prompt = _require(record, "prompt", name)
    solution = _require(record, "canonical_solution", name)
    test = _require(record, "test", name)
    entry_point = _require(record, "entry_point", name)
    return Example(
        id=_record_id(record, ("task_id",)),
        prompt=f"Complete the following Python function:\n\n```python\n{code_prompt.rstrip()}\n```",
        tests={"kind": "assert", "test": test, "entry_point": entry_point},
        trajectory=code_prompt + solution,
        source="humaneval",
        metadata={"code_prompt": code_prompt},
    )


def _function_under_test(code: str, test_source: str) -> str:
    """Name of the function the asserts call: the first function defined by the reference code
    whose name is called in the tests (an assert like `set(f(x)) == ...` calls `set` first)."""
    try:
        with warnings.catch_warnings():  # old MBPP code has invalid escapes like "\d" in strings
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
        defined = [
            node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
    except SyntaxError:
        defined = re.findall(r"^(?:def|class)\s+(\w+)", code, flags=re.MULTILINE)
    called = [n for n in defined if re.search(rf"\b{re.escape(n)}\s*\(", test_source)]
    return called[0] if called else (defined[0] if defined else "")


def from_mbpp(record: Record) -> Example | None:
    """MBPP in both styles: original mbpp.jsonl (`text`, `test_setup_code`) and sanitized-mbpp.json
    (`prompt`, `test_imports`). The prompt shows the asserts (as the benchmark does) so the model
    knows the function name and signature; the reference code is the trajectory. The asserts run
    at module level, so the entry point stays empty (no `check(...)` call); the name of the
    function under test is kept in metadata['function_name']."""
    name = "mbpp"
    description = _first_present(record, ("text", "prompt"), name)
    code = _require(record, "code", name).replace("\r\n", "\n")
    test_list = list(_require(record, "test_list", name))
    if not test_list:
        raise ValueError(f"adapter {name!r}: task {record.get('task_id')!r} has an empty test_list")
    setup_lines = [record.get("test_setup_code") or "", *(record.get("test_imports") or [])]
    setup = "\n".join(line for line in setup_lines if line.strip())
    asserts = "\n".join(test_list)
    test = f"{setup}\n\n{asserts}\n" if setup else f"{asserts}\n"
    return Example(
        id=f"mbpp/{record['task_id']}" if "task_id" in record else "",
        prompt=f"{description}\nYour code should pass these tests:\n\n{asserts}",
        tests={"kind": "assert", "test": test, "entry_point": ""},
        trajectory=code,
        source="mbpp",
        metadata={"task_id": record.get("task_id"), "function_name": _function_under_test(code, asserts)},
    )


def _stdio_cases(record: Record, adapter: str) -> list[dict[str, str]] | None:
    """Finds stdin/stdout cases in the common layouts; None when the tests are function calls."""
    def as_text(value: Any) -> str:
        return "\n".join(map(str, value)) if isinstance(value, list) else str(value)

    def from_lists(inputs, outputs) -> list[dict[str, str]]:
        if len(inputs) != len(outputs):
            raise ValueError(
                f"adapter {adapter!r}: {len(inputs)} inputs but {len(outputs)} outputs"
            )
        return [{"input": as_text(i), "output": as_text(o)} for i, o in zip(inputs, outputs)]

    def from_case_list(cases) -> list[dict[str, str]] | None:
        if any(c.get("fn_name") or c.get("type", "stdin_stdout") not in ("stdin_stdout", "stdin")
               or c.get("testtype", "stdin") != "stdin" for c in cases):
            return None
        return [{"input": as_text(c["input"]), "output": as_text(c["output"])} for c in cases]

    info = _maybe_json(record.get("verification_info"))
    if isinstance(info, Mapping):
        if info.get("language", "python") != "python":
            return None
        cases = _maybe_json(info.get("test_cases"))
        if isinstance(cases, list):
            return from_case_list(cases)
        if isinstance(cases, Mapping) and "inputs" in cases:
            return None if cases.get("fn_name") else from_lists(cases["inputs"], cases["outputs"])
    for field in ("input_output", "tests", "test_cases"):  # APPS/TACO, DeepCoder styles
        value = _maybe_json(record.get(field))
        if isinstance(value, Mapping) and "inputs" in value:
            return None if value.get("fn_name") else from_lists(value["inputs"], value["outputs"])
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            return from_case_list(value)
    if "inputs" in record and "outputs" in record:
        return from_lists(list(record["inputs"]), list(record["outputs"]))
    raise ValueError(
        f"adapter {adapter!r}: no test cases found; expected verification_info.test_cases, "
        f"input_output, tests, test_cases or inputs/outputs; fields are {sorted(record)}"
    )


def from_code_stdio(record: Record) -> Example | None:
    """Stdin/stdout programming problems (open-r1 verifiable-coding-problems, APPS/TACO, DeepCoder
    styles). Problems whose tests call a function rather than a program return None."""
    name = "code_stdio"
    problem = _first_present(
        record, ("problem", "prompt", "question", "problem_statement", "description"), name
    )
    cases = _stdio_cases(record, name)
    if not cases:
        return None
    solution = record.get("gold_standard_solution") or record.get("solution") or record.get("solutions")
    solution = _maybe_json(solution)
    if isinstance(solution, list):
        solution = solution[0] if solution else ""
    metadata = _maybe_json(record.get("metadata"))
    metadata = dict(metadata) if isinstance(metadata, Mapping) else {}
    difficulty = record.get("difficulty", metadata.get("difficulty"))
    return Example(
        id=_record_id(record, ("problem_id", "id", "task_id", "in_source_id")),
        prompt=problem,
        tests={"kind": "stdio", "cases": cases},
        trajectory=_fenced_code_body(str(solution or "")),
        source=str(record.get("source") or "code_stdio"),
        difficulty=float(difficulty) if isinstance(difficulty, (int, float)) else None,
        metadata=metadata,
    )


ADAPTERS: dict[str, Adapter] = {
    "openr1_math": from_openr1_math,
    "math": from_math,
    "gsm8k": from_gsm8k,
    "aime": from_aime,
    "multiple_choice": from_multiple_choice,
    "humaneval": from_humaneval,
    "mbpp": from_mbpp,
    "code_stdio": from_code_stdio,
}


def get_adapter(adapter: str | Adapter) -> Adapter:
    """An adapter by registry name, or the callable itself."""
    if callable(adapter):
        return adapter
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter={adapter!r} is unknown; valid adapters are {sorted(ADAPTERS)}")
    return ADAPTERS[adapter]
