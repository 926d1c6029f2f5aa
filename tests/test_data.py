"""Data: adapters on hand-written fixtures, file loading, prompts with the real Qwen3 tokenizer,
the prompt-length policy, and the checkpointable, sharded, multi-epoch batch iterator."""

import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from g2rpo_jax import data

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def raw_records(name: str) -> list[dict]:
    """The fixture's records read with plain json, independent of the loader."""
    with open(fixture(name), encoding="utf-8") as handle:
        if name.endswith(".json"):
            return json.load(handle)
        return [json.loads(line) for line in handle if line.strip()]


def assert_program(code: str, tests: dict) -> str:
    """The program the rewards' assert contract runs: code, test, then check(entry_point) if any."""
    program = f"{code}\n\n{tests['test']}\n"
    return program + (f"\ncheck({tests['entry_point']})\n" if tests["entry_point"] else "")


def run_python(source: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", source], input=stdin, capture_output=True, text=True, timeout=30
    )


# ----------------------------------------------------------------------------- reference helpers

def reference_last_box(text: str) -> str:
    """Plain re-derivation for the fixtures: scan the last box character by character, counting
    only unescaped braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    rest = text[start:].split("{", 1)
    if " " in rest[0]:  # "\boxed 7" form
        return text[start:].split()[1].rstrip("$.")
    body, depth, escaped = "", 1, False
    for char in rest[1]:
        if not escaped and char in "{}":
            depth += 1 if char == "{" else -1
            if depth == 0:
                return body
        escaped = char == "\\" and not escaped
        body += char
    raise AssertionError("unbalanced box in fixture")


# ----------------------------------------------------------------------------- Example

def test_example_requires_one_prompt_form_and_one_scorer():
    with pytest.raises(ValueError, match="exactly one of prompt= or messages="):
        data.Example(id="x", answer="1")
    with pytest.raises(ValueError, match="exactly one of answer="):
        data.Example(id="x", prompt="p")
    with pytest.raises(ValueError, match="kind='pytest'"):
        data.Example(id="x", prompt="p", tests={"kind": "pytest"})
    with pytest.raises(ValueError, match="non-empty 'cases'"):
        data.Example(id="x", prompt="p", tests={"kind": "stdio", "cases": []})
    with pytest.raises(ValueError, match="role in"):
        data.Example(id="x", messages=({"role": "robot", "content": "hi"},), answer="1")
    example = data.Example(id="x", prompt="p", tests={"kind": "stdio", "cases": [{"input": "", "output": "1"}]})
    assert example.task == "code_stdio" and example.is_code


def test_unknown_adapter_lists_valid_names():
    with pytest.raises(ValueError, match="adapter='nope' is unknown; valid adapters are"):
        data.load_examples(fixture("gsm8k.jsonl"), "nope")


# ----------------------------------------------------------------------------- adapters

def test_openr1_picks_first_verified_complete_generation_and_skips_unverified(caplog):
    records = raw_records("openr1_math.jsonl")
    with caplog.at_level(logging.WARNING):
        examples = data.load_examples(fixture("openr1_math.jsonl"), "openr1_math")
    # Reference choice: first i with correctness and (if given) completeness both true.
    expected = {}
    for record in records:
        complete = record.get("is_reasoning_complete", [True] * len(record["generations"]))
        picks = [i for i, (ok, done) in enumerate(zip(record["correctness_math_verify"], complete)) if ok and done]
        if picks:
            expected[record["uuid"]] = (record["generations"][picks[0]], picks[0])
    assert [e.id for e in examples] == list(expected)
    assert len(examples) == len(records) - 1  # fx-openr1-2 has no verified generation
    for example in examples:
        assert (example.trajectory, example.metadata["generation_index"]) == expected[example.id]
    by_id = {e.id: e for e in examples}
    assert by_id["fx-openr1-1"].metadata["generation_index"] == 1  # generation 0 is wrong
    assert by_id["fx-openr1-3"].metadata["generation_index"] == 1  # generation 0 is cut off
    assert by_id["fx-openr1-1"].answer == "5" and by_id["fx-openr1-1"].source == "olympiads"
    # An empty answer field falls back to the solution's last box.
    assert by_id["fx-openr1-4"].answer == "\\frac{1}{2}"
    assert "skipped 1 record" in caplog.text


def test_math_answer_field_else_last_balanced_box():
    records = raw_records("math.jsonl")
    examples = data.load_examples(fixture("math.jsonl"), "math")
    assert len(examples) == len(records)
    for record, example in zip(records, examples):
        expected = record.get("answer") or reference_last_box(record["solution"])
        assert example.answer == expected
        assert example.trajectory == record["solution"]
        assert example.prompt == record["problem"]
    answers = [e.answer for e in examples]
    # Spelled out for the tricky fixtures: nested, escaped, brace-less and \fbox forms.
    assert answers[1:] == ["\\frac{\\sqrt{3}}{2}", "\\{1, 2\\}", "7", "12"]
    assert [e.difficulty for e in examples] == [2.0, 4.0, None, 1.0, 1.0]
    assert examples[0].id == "test/algebra/fx1.json" and examples[1].id == "math/7"


@pytest.mark.parametrize("text", ["no box here", "\\boxed{unclosed", "\\boxed"])
def test_last_boxed_answer_none_without_complete_box(text):
    assert data.last_boxed_answer(text) is None


def test_gsm8k_answer_after_hashes_and_trajectory_without_calculator_markup():
    records = raw_records("gsm8k.jsonl")
    examples = data.load_examples(fixture("gsm8k.jsonl"), "gsm8k")
    for record, example in zip(records, examples):
        reasoning, final = record["answer"].split("####")
        expected_answer = final.strip().replace(",", "")
        assert example.answer == expected_answer
        assert "<<" not in example.trajectory and ">>" not in example.trajectory
        assert example.trajectory.endswith(f"\\boxed{{{expected_answer}}}$.")
        assert example.prompt == record["question"] and example.source == "gsm8k"
    assert examples[0].trajectory.startswith("Tom has 3 * 4 = 12 apples.\nAfter eating 2 he has 12 - 2 = 10")
    assert [e.id for e in examples] == ["gsm8k.jsonl/0", "gsm8k.jsonl/1"]


def test_aime_styles_normalize_answers_and_keep_only_real_solutions():
    records = raw_records("aime.jsonl")
    examples = data.load_examples(fixture("aime.jsonl"), "aime")
    assert [e.answer for e in examples] == [str(int(r["answer"])) for r in records]
    assert examples[0].trajectory == records[0]["solution"] and examples[0].id == "aime/7"
    assert examples[1].trajectory == ""  # no solution field at all
    assert examples[2].trajectory == ""  # the "solution" is only the answer
    assert examples[3].prompt == records[3]["question"] and examples[3].difficulty == 2.0
    assert examples[3].metadata["year"] == 1983


def test_humaneval_tests_run_the_check_and_gold_code_passes():
    records = raw_records("humaneval.jsonl")
    examples = data.load_examples(fixture("humaneval.jsonl"), "humaneval")
    for record, example in zip(records, examples):
        assert example.id == record["task_id"]
        assert example.tests["entry_point"] == record["entry_point"]
        assert record["prompt"].strip() in example.prompt
        assert example.tests["test"] == record["test"]
        assert example.trajectory == record["prompt"] + record["canonical_solution"]
        assert run_python(assert_program(example.trajectory, example.tests)).returncode == 0
        # A wrong body must fail, so check() really runs.
        wrong = record["prompt"] + "    return None\n"
        assert run_python(assert_program(wrong, example.tests)).returncode != 0


@pytest.mark.parametrize("name", ["mbpp.jsonl", "sanitized_mbpp.json"])
def test_mbpp_both_styles(name):
    records = raw_records(name)
    examples = data.load_examples(fixture(name), "mbpp")
    expected_function_names = {901: "max_of_three", 903: "hypotenuse", 902: "shared_items", 904: "sum_of_squares"}
    for record, example in zip(records, examples):
        assert example.id == f"mbpp/{record['task_id']}"
        assert example.tests["entry_point"] == ""  # module-level asserts: nothing to check()
        assert example.metadata["function_name"] == expected_function_names[record["task_id"]]
        assert "\r" not in example.trajectory
        assert example.trajectory == record["code"].replace("\r\n", "\n")
        for assertion in record["test_list"]:
            assert assertion in example.tests["test"] and assertion in example.prompt
        setup = record.get("test_setup_code") or "\n".join(record.get("test_imports", []))
        assert example.tests["test"].startswith(setup)
        assert run_python(assert_program(example.trajectory, example.tests)).returncode == 0
        # A wrong solution fails, so the asserts really run.
        broken = example.trajectory.replace("return", "return 1 + ")
        assert run_python(assert_program(broken, example.tests)).returncode != 0


def test_code_stdio_layouts_and_function_call_problems_skipped():
    records = raw_records("code_stdio.jsonl")
    examples = data.load_examples(fixture("code_stdio.jsonl"), "code_stdio")
    assert [e.id for e in examples] == ["fx-stdio-1", "fx-stdio-2", "fx-stdio-3", "fx-stdio-5"]
    assert [len(e.tests["cases"]) for e in examples] == [2, 1, 2, 2]
    assert examples[0].trajectory == "a, b = map(int, input().split())\nprint(a + b)"  # fence stripped
    assert examples[0].difficulty == 800.0 and examples[1].difficulty == 1200.0
    assert examples[2].difficulty is None  # 'interview' is not a number
    assert examples[0].source == "codeforces" and examples[3].source == "code_stdio"
    for example in examples:
        for case in example.tests["cases"]:
            result = run_python(example.trajectory, stdin=case["input"])
            assert result.stdout.strip() == case["output"].strip(), example.id
    assert len(records) == 5


def test_fully_guided_code_rollouts_score_one_with_the_rewards():
    """The fenced reference trajectory, scored by the project's code reward, passes every
    fixture's tests: the tests dicts follow the rewards' contract."""
    from g2rpo_jax.rewards import code_reward

    examples = [
        example
        for name, adapter in [("humaneval.jsonl", "humaneval"), ("mbpp.jsonl", "mbpp"),
                              ("sanitized_mbpp.json", "mbpp"), ("code_stdio.jsonl", "code_stdio")]
        for example in data.load_examples(fixture(name), adapter)
    ]
    for example in examples:
        completion = f"```python\n{example.trajectory.rstrip()}\n```"
        assert code_reward(completion, example.tests) == 1.0, example.id



def test_multiple_choice_gpqa_fields_and_the_generic_layout():
    path = os.path.join(os.path.dirname(__file__), "fixtures", "eval", "gpqa_style.jsonl")
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    gpqa = data.load_examples(path, "multiple_choice")
    for example, record in zip(gpqa, records, strict=True):
        options = dict(line.split(") ", 1) for line in example.prompt.splitlines() if line[1:3] == ") ")
        wrong = [record[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        assert sorted(options.values()) == sorted([record["Correct Answer"], *wrong])
        assert options[example.answer] == record["Correct Answer"]  # the letter of the shuffled correct option
        assert example.trajectory == record["Explanation"] and example.id == record["Record ID"]
    # GPQA lists the correct answer first; the shuffle moves it, the same way on every read.
    assert [e.answer for e in gpqa] == ["B", "C", "A"]
    assert [e.answer for e in data.load_examples(path, "multiple_choice")] == ["B", "C", "A"]
    adapter = data.get_adapter("multiple_choice")
    for answer in ("C", "(c)", 2, "blue"):
        example = adapter({"question": "Sky?", "choices": ["red", "green", "blue"], "answer": answer})
        assert example.answer == "C" and example.prompt.startswith("Sky?\n\nA) red\nB) green\nC) blue")
    mapping = adapter({"question": "Q", "options": {"B": "y", "A": "x"}, "answer": "A"})
    assert mapping.prompt.startswith("Q\n\nA) x\nB) y") and mapping.answer == "A"
    with pytest.raises(ValueError, match=r"answer 'D' is neither a letter in 'ABC'"):
        adapter({"question": "Sky?", "choices": ["red", "green", "blue"], "answer": "D"})
    with pytest.raises(ValueError, match=r"choices must be a list of 2 to 10 options"):
        adapter({"question": "Q", "choices": ["only one"], "answer": 0})

# ----------------------------------------------------------------------------- loading

def test_load_from_jsonl_json_gz_parquet_give_the_same_examples(tmp_path):
    records = raw_records("gsm8k.jsonl")
    reference = data.load_examples(fixture("gsm8k.jsonl"), "gsm8k")

    json_path = tmp_path / "gsm8k.json"
    json_path.write_text(json.dumps(records))
    wrapped_path = tmp_path / "wrapped.json"
    wrapped_path.write_text(json.dumps({"data": records}))
    gz_path = tmp_path / "gsm8k.jsonl.gz"
    with gzip.open(gz_path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    pretend_json = tmp_path / "lines.json"  # some ".json" files are really jsonl
    pretend_json.write_text("".join(json.dumps(r) + "\n" for r in records))

    def strip_ids(examples):
        return [(e.prompt, e.answer, e.trajectory) for e in examples]

    for path in (json_path, wrapped_path, gz_path, pretend_json):
        assert strip_ids(data.load_examples(str(path), "gsm8k")) == strip_ids(reference), path

    parquet = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")
    import pyarrow

    parquet_path = tmp_path / "openr1.parquet"
    openr1 = raw_records("openr1_math.jsonl")
    for record in openr1:  # parquet needs one schema: fill the optional column
        record.setdefault("is_reasoning_complete", [True] * len(record["generations"]))
    parquet.write_table(pyarrow.Table.from_pylist(openr1), parquet_path)
    from_parquet = data.load_examples(str(parquet_path), "openr1_math")
    assert [(e.id, e.trajectory) for e in from_parquet] == [
        (e.id, e.trajectory) for e in data.load_examples(fixture("openr1_math.jsonl"), "openr1_math")
    ]


def test_limit_counts_kept_examples_and_local_errors(tmp_path):
    kept = data.load_examples(fixture("openr1_math.jsonl"), "openr1_math", limit=2)
    assert [e.id for e in kept] == ["fx-openr1-1", "fx-openr1-3"]  # the skipped row does not count
    assert data.load_examples(fixture("gsm8k.jsonl"), "gsm8k", limit=0) == []
    with pytest.raises(ValueError, match="split='test' applies to Hugging Face dataset names only"):
        data.load_examples(fixture("gsm8k.jsonl"), "gsm8k", split="test")
    with pytest.raises(FileNotFoundError):
        data.load_examples(str(tmp_path / "missing.jsonl"), "gsm8k")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"row 0: adapter 'gsm8k': record has no field 'answer'"):
        data.load_examples(str(bad), "gsm8k")


def test_loading_a_dataset_imports_no_reward_machinery():
    """Data shares only plain text helpers with the rewards (g2rpo_jax.task_format): loading a
    dataset must not start the sandbox, the reward pool or math-verify. In a fresh interpreter,
    so the modules other tests imported do not count."""
    script = textwrap.dedent(f"""
        import json, sys
        from g2rpo_jax import data
        examples = data.load_examples({fixture("math.jsonl")!r}, "math")
        heavy = [m for m in sys.modules if "sandbox" in m or "pool" in m or "math_verify" in m
                 or m.startswith("g2rpo_jax.rewards")]
        print(json.dumps({{"examples": len(examples), "heavy": heavy}}))
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["examples"] > 0
    assert report["heavy"] == []


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch, tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(ImportError, match="needs the 'pyarrow' package"):
        data.load_examples(str(path), "gsm8k")


def test_hub_name_without_datasets_package_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets.*HF_DATASETS_OFFLINE"):
        data.load_examples("some-org/some-dataset", "gsm8k")


def test_hub_offline_error_and_local_dataset_directory(tmp_path):
    """In a fresh process with an empty cache and offline mode: an unreachable name raises the
    offline hint, and a local dataset directory is read through `datasets`."""
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    directory = tmp_path / "local_ds"
    directory.mkdir()
    (directory / "train.jsonl").write_text(open(fixture("gsm8k.jsonl"), encoding="utf-8").read())
    script = textwrap.dedent(f"""
        import json
        from g2rpo_jax import data
        try:
            data.load_examples("nonexistent-org/nonexistent-dataset", "gsm8k")
            print(json.dumps({{"error": None}}))
        except ValueError as error:
            print(json.dumps({{"error": str(error)}}))
        examples = data.load_examples({str(directory)!r}, "gsm8k")
        print(json.dumps({{"answers": [e.answer for e in examples]}}))
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    error = lines[0]["error"]
    assert error and "could not be loaded" in error and "HF_DATASETS_OFFLINE" in error and "local path" in error
    expected = [r["answer"].split("####")[1].strip().replace(",", "") for r in raw_records("gsm8k.jsonl")]
    assert lines[1]["answers"] == expected


# ----------------------------------------------------------------------------- prompts (real tokenizer)

@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from g2rpo_jax.models.tokenizer import load_tokenizer, qwen3_tokenizer_dir

    return load_tokenizer(qwen3_tokenizer_dir())


def chatml(turns, thinking_off: bool) -> str:
    """Reference ChatML text for Qwen3, written out by hand from the template's format."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    text += "<|im_start|>assistant\n"
    return text + ("<think>\n\n</think>\n\n" if thinking_off else "")


MATH_EXAMPLE = data.Example(id="m", prompt="What is $1+1$?", answer="2", trajectory="We add: $\\boxed{2}$.")
CODE_EXAMPLE = data.Example(
    id="c", prompt="Write f.", tests={"kind": "assert", "test": "assert f() == 1", "entry_point": "f"},
    trajectory="def f():\n    return 1\n",
)


def test_chat_prompt_thinking_on_and_off(qwen3_tokenizer):
    tok = qwen3_tokenizer
    instruction = data.DEFAULT_INSTRUCTIONS["math"]
    user = f"{MATH_EXAMPLE.prompt}\n\n{instruction}"
    on = data.build_prompt(MATH_EXAMPLE, tok, data.PromptSettings(enable_thinking=True))
    off = data.build_prompt(MATH_EXAMPLE, tok, data.PromptSettings(enable_thinking=False))
    default = data.build_prompt(MATH_EXAMPLE, tok)
    assert tok.decode(on) == chatml([("user", user)], thinking_off=False)
    assert tok.decode(off) == chatml([("user", user)], thinking_off=True)
    assert default == on  # Qwen3's template thinks unless told otherwise
    assert off[: len(on)] == on and len(off) > len(on)
    think_ids = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert all(t in off[len(on):] for t in think_ids) and not any(t in on for t in think_ids)
    assert "\\boxed{}" in tok.decode(on)
    assert on == tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=True, add_generation_prompt=True,
        enable_thinking=True, return_dict=False,
    )


def test_chat_prompt_system_instruction_and_messages(qwen3_tokenizer):
    tok = qwen3_tokenizer
    settings = data.PromptSettings(system="Be brief.", instruction="", enable_thinking=True)
    ids = data.build_prompt(MATH_EXAMPLE, tok, settings)
    assert tok.decode(ids) == chatml([("system", "Be brief."), ("user", MATH_EXAMPLE.prompt)], thinking_off=False)
    code_text = tok.decode(data.build_prompt(CODE_EXAMPLE, tok))
    assert data.DEFAULT_INSTRUCTIONS["code_assert"] in code_text and "```python" in code_text
    chat = data.Example(id="t", messages=({"role": "user", "content": "Hi there"},), answer="x")
    thinking = data.PromptSettings(enable_thinking=True)
    assert tok.decode(data.build_prompt(chat, tok, thinking)) == chatml([("user", "Hi there")], False)
    with pytest.raises(ValueError, match="template='jinja' is unknown; valid templates are"):
        data.PromptSettings(template="jinja")


def test_plain_prompt_has_no_chat_tokens(qwen3_tokenizer):
    tok = qwen3_tokenizer
    settings = data.PromptSettings(template="plain", system="You are a careful solver.")
    ids = data.build_prompt(MATH_EXAMPLE, tok, settings)
    expected = (
        "You are a careful solver.\n\nQuestion:\n"
        f"{MATH_EXAMPLE.prompt}\n\n{data.DEFAULT_INSTRUCTIONS['math']}\n\nAnswer:\n"
    )
    assert tok.decode(ids) == expected
    specials = set(tok.all_special_ids)
    assert not specials.intersection(ids)


def test_trajectory_ids_round_trip_and_fence_code(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = data.encode_trajectory(MATH_EXAMPLE, tok)
    assert tok.decode(ids) == MATH_EXAMPLE.trajectory
    code_ids = data.encode_trajectory(CODE_EXAMPLE, tok)
    assert tok.decode(code_ids) == "```python\ndef f():\n    return 1\n```"
    assert tok.decode(data.encode_trajectory(CODE_EXAMPLE, tok, fence_code=False)) == CODE_EXAMPLE.trajectory
    empty = data.Example(id="e", prompt="p", answer="1")
    assert data.encode_trajectory(empty, tok) == []


def test_stop_and_pad_ids(qwen3_tokenizer):
    tok = qwen3_tokenizer
    im_end, end_of_text = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    stops = data.stop_token_ids(tok)
    assert set(stops) == {im_end, end_of_text, tok.eos_token_id}
    assert tok.eos_token == "<|im_end|>"  # the instruct template ends turns with <|im_end|>
    assert data.pad_token_id(tok) == tok.pad_token_id == end_of_text


# ----------------------------------------------------------------------------- length policy

def test_length_policy_drop_and_truncate_counts(caplog):
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, 100, size=n)) for n in (3, 9, 5, 12, 5, 6)]
    limit = 5
    over = [i for i, p in enumerate(prompts) if len(p) > limit]  # reference
    with caplog.at_level(logging.WARNING):
        kept_at, kept, report = data.apply_length_policy(prompts, limit, "drop")
    assert kept_at == [i for i in range(len(prompts)) if i not in over]
    assert kept == [prompts[i] for i in kept_at]
    assert (report.total, report.kept, report.dropped, report.truncated) == (6, 6 - len(over), len(over), 0)
    assert report.longest == max(map(len, prompts))
    assert f"dropped {len(over)}" in caplog.text

    kept_at, kept, report = data.apply_length_policy(prompts, limit, "truncate_left")
    assert kept_at == list(range(len(prompts)))
    assert kept == [p[len(p) - limit:] if len(p) > limit else p for p in prompts]
    assert (report.dropped, report.truncated) == (0, len(over))

    _, kept, report = data.apply_length_policy(prompts, 0, "drop")
    assert kept == prompts and report.dropped == report.truncated == 0
    with pytest.raises(ValueError, match="overlong='cut' is unknown; valid policies are"):
        data.apply_length_policy(prompts, limit, "cut")


def test_prepare_prompts_matches_per_example_build_and_counts_drops(qwen3_tokenizer, caplog):
    tok = qwen3_tokenizer
    examples = data.load_examples(fixture("math.jsonl"), "math") + data.load_examples(fixture("mbpp.jsonl"), "mbpp")
    singles = [data.build_prompt(e, tok, data.PromptSettings(enable_thinking=False)) for e in examples]
    limit = sorted(map(len, singles))[len(singles) // 2]
    with caplog.at_level(logging.WARNING):
        prepared = data.prepare_prompts(examples, tok, enable_thinking=False, max_prompt_tokens=limit)
    kept = [i for i, ids in enumerate(singles) if len(ids) <= limit]
    assert prepared.report.dropped == len(singles) - len(kept) > 0
    assert [e.id for e in prepared.examples] == [examples[i].id for i in kept]
    assert [list(ids) for ids in prepared.prompt_ids] == [singles[i] for i in kept]
    assert [list(t) for t in prepared.trajectory_ids] == [data.encode_trajectory(examples[i], tok) for i in kept]
    assert "prompt length policy" in caplog.text
    same = data.prepare_prompts(examples, tok, data.PromptSettings(enable_thinking=False, max_prompt_tokens=limit))
    assert same == prepared  # the settings form and the keyword form agree
    with pytest.raises(TypeError, match="thinking"):
        data.prepare_prompts(examples, tok, thinking=False)


def test_prompt_settings_read_and_write_the_config_keys():
    settings = data.PromptSettings.from_config(data.get_default_config(), "data")
    assert settings == data.PromptSettings(max_prompt_tokens=1024)
    assert (settings.template, settings.overlong) == ("chat", "drop")
    assert (settings.system, settings.instruction, settings.enable_thinking) == (None, None, None)
    assert data.PromptSettings(system="", max_prompt_tokens=0) == data.PromptSettings()  # the config's "none"
    custom = data.PromptSettings(template="plain", system="S", instruction="", enable_thinking=False,
                                 max_prompt_tokens=7, overlong="truncate_left")
    assert data.PromptSettings.from_config(custom.as_config()) == custom
    config = data.PromptSettings().as_config()
    assert (config.system, config.max_prompt_tokens, config.instruction, config.enable_thinking) == ("", 0, None, None)
    config.enable_thinking, config.instruction = False, "Go."  # typed placeholders take overrides of their type
    with pytest.raises(TypeError):
        config.enable_thinking = "yes"


@pytest.mark.parametrize("key, value, message", [
    ("template", "jinja", "data.template='jinja' is unknown; valid templates are"),
    ("overlong", "cut", "data.overlong='cut' is unknown; valid policies are"),
    ("max_prompt_tokens", -1, "data.max_prompt_tokens=-1 must be None, 0"),
])
def test_prompt_settings_refuse_bad_values_naming_the_key(key, value, message):
    cfg = data.get_default_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        data.PromptSettings.from_config(cfg, "data")


# ----------------------------------------------------------------------------- iterator

def take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("interrupt_at", [1, 2, 3, 5])
def test_resume_from_json_state_matches_uninterrupted_run_across_epochs(interrupt_at):
    # 10 items, global batch 4: batch 2 straddles the first epoch boundary (positions 8..11).
    settings = dict(seed=3, process_index=0, process_count=1)
    uninterrupted = take(data.BatchIterator(range(10), 4, **settings), 8)

    first = data.BatchIterator(range(10), 4, **settings)
    head = take(first, interrupt_at)
    saved = json.loads(json.dumps(first.get_state()))
    take(first, 2)  # the old iterator runs on; the restored one must not care
    resumed = data.BatchIterator(range(10), 4, **settings)
    resumed.set_state(saved)
    assert resumed.step == interrupt_at and resumed.epoch == interrupt_at * 4 // 10
    tail = take(resumed, 8 - interrupt_at)
    assert head + tail == uninterrupted


def test_epochs_are_distinct_permutations_and_seeds_matter():
    n, batch = 12, 4
    stream = sum(take(data.BatchIterator(range(n), batch, seed=0, process_index=0, process_count=1), 9), [])
    epochs = [stream[i:i + n] for i in range(0, len(stream), n)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    other_seed = sum(take(data.BatchIterator(range(n), batch, seed=1, process_index=0, process_count=1), 3), [])
    assert other_seed != epochs[0]
    unshuffled = sum(take(data.BatchIterator(range(n), batch, shuffle=False, process_index=0, process_count=1), 6), [])
    assert unshuffled == list(range(n)) * 2


@pytest.mark.parametrize("num_items,global_batch,hosts", [(24, 8, 4), (10, 4, 2), (7, 6, 3)])
def test_host_shards_are_disjoint_and_cover_the_global_batch(num_items, global_batch, hosts):
    steps = 5
    single = take(data.BatchIterator(range(num_items), global_batch, seed=7, process_index=0, process_count=1), steps)
    per_host = [
        take(data.BatchIterator(range(num_items), global_batch, seed=7, process_index=h, process_count=hosts), steps)
        for h in range(hosts)
    ]
    rows = global_batch // hosts
    for step in range(steps):
        for host in range(hosts):
            assert per_host[host][step] == single[step][host * rows:(host + 1) * rows]
    # Within one epoch's worth of global positions, hosts read disjoint items that cover it.
    positions_per_epoch = num_items - num_items % global_batch
    if positions_per_epoch:
        full_steps = positions_per_epoch // global_batch
        seen = [item for host in range(hosts) for batch in per_host[host][:full_steps] for item in batch]
        assert len(seen) == len(set(seen)) == positions_per_epoch


def test_sharded_resume_on_another_host_count():
    """Global batches do not depend on the host count, so a 2-host state resumes on 1 host."""
    two_hosts = [data.BatchIterator(range(9), 4, seed=5, process_index=h, process_count=2) for h in range(2)]
    for iterator in two_hosts:
        take(iterator, 3)
    state = json.loads(json.dumps(two_hosts[0].get_state()))
    assert state == json.loads(json.dumps(two_hosts[1].get_state()))
    one_host = data.BatchIterator(range(9), 4, seed=5, process_index=0, process_count=1)
    one_host.set_state(state)
    next_global = next(one_host)
    assert next_global == next(two_hosts[0]) + next(two_hosts[1])


def test_curriculum_orders_by_rank_and_shuffles_only_within_ranks():
    sources = ["aime", "gsm8k", "math", "gsm8k", "math", "aime", "gsm8k", "math", "gsm8k", "aime", "math", "gsm8k"]
    examples = [data.Example(id=str(i), prompt="p", answer="1", source=s) for i, s in enumerate(sources)]
    order = ("gsm8k", "math", "aime")
    ranks = data.curriculum_ranks(examples, "source", order)
    assert ranks == [order.index(s) for s in sources]
    n = len(examples)
    iterator = data.BatchIterator(examples, 4, seed=0, ranks=ranks, process_index=0, process_count=1)
    stream = [e.id for batch in take(iterator, 2 * n // 4) for e in batch]
    epochs = [stream[:n], stream[n:]]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [str(i) for i in range(n)]
        epoch_ranks = [ranks[int(i)] for i in epoch]
        assert epoch_ranks == sorted(epoch_ranks)  # easy to hard
    assert epochs[0] != epochs[1]  # reshuffled within ranks
    fixed = data.BatchIterator(examples, 4, shuffle=False, ranks=ranks, process_index=0, process_count=1)
    fixed_ids = [int(e.id) for batch in take(fixed, n // 4) for e in batch]
    assert fixed_ids == sorted(range(n), key=lambda i: (ranks[i], i))
    # Natural order of values when none is given; metadata keys work too.
    assert data.curriculum_ranks(examples, "source") == [sorted(set(sources)).index(s) for s in sources]
    with pytest.raises(ValueError, match="does not list the 'source' values"):
        data.curriculum_ranks(examples, "source", ("gsm8k", "math"))
    with pytest.raises(ValueError, match="curriculum_key='level'"):
        data.curriculum_ranks(examples, "level")


def test_state_refused_under_another_order_and_bad_settings():
    iterator = data.BatchIterator(range(10), 4, seed=1, process_index=0, process_count=1)
    next(iterator)
    other = data.BatchIterator(range(10), 4, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="saved with seed=1 but this iterator has seed=2"):
        other.set_state(iterator.get_state())
    with pytest.raises(ValueError, match="global_batch_size=6 must be positive and divisible by process_count=4"):
        data.BatchIterator(range(10), 6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2, process_count=2"):
        data.BatchIterator(range(10), 4, process_index=2, process_count=2)


def test_process_defaults_come_from_jax():
    import jax

    iterator = data.BatchIterator(range(5), 2)
    assert (iterator.process_index, iterator.process_count) == (jax.process_index(), jax.process_count())


# ----------------------------------------------------------------------------- config

def test_config_end_to_end(qwen3_tokenizer):
    cfg = data.get_default_config()
    cfg.source = fixture("code_stdio.jsonl")
    cfg.adapter = "code_stdio"
    cfg.enable_thinking = False
    cfg.batch_size = 2
    cfg.curriculum_key = "source"
    cfg.curriculum_order = ("code_stdio", "atcoder", "codeforces")
    prepared = data.prepare_from_config(cfg, qwen3_tokenizer)
    assert len(prepared) == 4 and prepared.report.dropped == 0
    iterator = data.iterator_from_config(cfg, prepared, process_index=0, process_count=1)
    first_epoch = [prepared.examples[i].source for batch in take(iterator, 2) for i in batch]
    assert first_epoch == ["code_stdio", "code_stdio", "atcoder", "codeforces"]
    for key in ("source", "adapter", "template", "system", "instruction", "max_prompt_tokens",
                "overlong", "seed", "curriculum_key", "batch_size"):
        assert key in cfg
