"""count_dataset: each line format counted exactly, the 4-characters estimate, real tokenizers built locally, gzip,
and one-line errors for every kind of bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from lorascope.errors import DatasetError, InvalidOptionError, LorascopeError
from lorascope.inputs.datasets import DatasetSize, count_dataset


class Words:
    """A fake tokenizer: one token per whitespace-separated word."""

    def encode(self, text):
        return text.split()


def write_jsonl(path, records, *, compress=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


CHAT = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Name two primes"}, {"type": "image", "url": "x.png"}]},
    {"role": "assistant", "content": "two and three"},
    {"role": "user", "content": "one more"},
    {"role": "assistant", "content": [{"type": "text", "text": "five"}]},
    {"role": "assistant", "content": None, "tool_calls": []},
]}

FORMATS = [  # (record, tokens, completion tokens, fields) with one token per word
    (CHAT, 3 + 3 + 3 + 2 + 1, 3 + 1, "messages"),
    ({"prompt": "What is two plus two?", "completion": "It is four."}, 5 + 3, 3, "prompt/completion"),
    ({"instruction": "Translate to French", "input": "good morning", "output": "bonjour"}, 3 + 2 + 1, 1,
     "instruction/input/output"),
    ({"instruction": "Say hi", "output": "hi there"}, 2 + 2, 2, "instruction/input/output"),
    ({"instruction": "Say hi", "input": None, "output": "hi"}, 2 + 1, 1, "instruction/input/output"),
    ({"question": "Capital of Peru?", "answer": "Lima", "id": 7}, 3 + 1, 1, "question/answer"),
    ({"text": "Once upon a time there was a rank."}, 8, 8, "text"),
]


@pytest.mark.parametrize(("record", "tokens", "completion", "fields"), FORMATS)
def test_each_format_counted_exactly(tmp_path, record, tokens, completion, fields):
    path = write_jsonl(tmp_path / "train.jsonl", [record, record, record])
    size = count_dataset(path, tokenizer=Words())
    assert size == DatasetSize(3, 3 * tokens, 3 * completion, "tokenizer Words", fields)
    assert size.tokens_per_example == completion


def test_mixed_formats_blank_lines_and_empty_completions(tmp_path):
    records = [CHAT, "", "   ", {"text": "a b c"}, {"prompt": "p q", "completion": ""}, CHAT]
    size = count_dataset(write_jsonl(tmp_path / "mixed.jsonl", records), tokenizer=Words())
    assert (size.examples, size.tokens, size.completion_tokens) == (4, 2 * 12 + 3 + 2, 2 * 4 + 3)
    assert size.fields == "messages+text+prompt/completion"
    assert size.tokens_per_example == pytest.approx(11 / 4)
    assert json.loads(json.dumps(size.to_dict())) == {
        "examples": 4, "tokens": 29, "completion_tokens": 11, "counted_with": "tokenizer Words",
        "fields": "messages+text+prompt/completion", "tokens_per_example": 2.75}


def test_estimate_is_four_characters_per_token_per_piece(tmp_path):
    record = {"instruction": "abcde", "input": "abcd", "output": "é" * 9}  # characters, not bytes
    size = count_dataset(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert (size.tokens, size.completion_tokens) == (2 + 1 + 3, 3)
    assert size.counted_with == "estimate: 4 characters per token"
    chat = count_dataset(write_jsonl(tmp_path / "c.jsonl", [CHAT]))  # pieces of 14, 15, 13, 8 and 4 characters
    assert (chat.tokens, chat.completion_tokens) == (4 + 4 + 4 + 2 + 1, 4 + 1)


def test_gzip_counts_like_plain(tmp_path):
    records = [r for r, *_ in FORMATS]
    plain = count_dataset(write_jsonl(tmp_path / "d.jsonl", records), tokenizer=Words())
    packed = count_dataset(write_jsonl(tmp_path / "d.jsonl.gz", records, compress=True), tokenizer=Words())
    assert packed == plain
    assert plain.fields == "messages+prompt/completion+instruction/input/output+question/answer+text"


SENTENCES = ["the rank of the update", "a small adapter learns the task", "two and three make five"]


@pytest.fixture
def word_tokenizer(tmp_path):
    """A real tokenizers WordLevel tokenizer trained in-process, adding [BOS] unless told not to."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"]))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    assert len(tok.encode("the rank").ids) == 3  # the [BOS] that counting must leave out
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def test_real_tokenizer_file_object_and_transformers_directory(tmp_path, word_tokenizer):
    tok, path = word_tokenizer
    records = [{"prompt": SENTENCES[0], "completion": SENTENCES[1]}, {"text": SENTENCES[2] + " unseen words"}]
    data = write_jsonl(tmp_path / "t.jsonl", records)
    expected = (5 + 6 + 7, 6 + 7)
    from_file = count_dataset(data, tokenizer=path)
    assert (from_file.tokens, from_file.completion_tokens) == expected
    assert from_file.counted_with == f"tokenizer {path}"
    from_object = count_dataset(data, tokenizer=tok)
    assert (from_object.tokens, from_object.completion_tokens) == expected

    transformers = pytest.importorskip("transformers")
    directory = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    from_dir = count_dataset(data, tokenizer=str(directory))
    assert (from_dir.tokens, from_dir.completion_tokens) == expected
    assert from_dir.counted_with == f"tokenizer {directory}"


def test_callable_tokenizer_returning_input_ids(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"question": "a b", "answer": "c d e"}])
    size = count_dataset(data, tokenizer=lambda text: {"input_ids": list(range(len(text.split())))})
    assert (size.tokens, size.completion_tokens) == (5, 3)


def assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(tmp_path / "nope.jsonl")
    assert_one_line(excinfo, "does not exist")
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(tmp_path)
    assert_one_line(excinfo, "is a directory")
    with pytest.raises(DatasetError):  # the file is checked before a tokenizer is loaded
        count_dataset(tmp_path / "nope.jsonl", tokenizer=3)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_no_examples(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(path)
    assert_one_line(excinfo, "no examples")


ALL_FORMATS = ('{"messages"', '{"prompt", "completion"}', '{"instruction"', '{"question", "answer"}', '{"text"}')


@pytest.mark.parametrize(("bad_line", "fragments"), [
    ("{not json", ("Line 3", "is not JSON")),
    ('{"text": "a"', ("Line 3", "is not JSON")),
    ("[1, 2]", ("Line 3", "list, not an object", *ALL_FORMATS)),
    ("42", ("Line 3", "int, not an object")),
    ('{"chosen": "a", "rejected": "b"}', ("Line 3", "none of the supported fields", "chosen, rejected", *ALL_FORMATS)),
    ('{"prompt": "only a prompt"}', ("Line 3", "none of the supported fields")),
    ('{"prompt": "p", "completion": ["c"]}', ("Line 3", "'completion' must be a string", "Got list")),
    ('{"messages": "hi"}', ("Line 3", "'messages' must be a list")),
    ('{"messages": [{"content": "no role"}]}', ("Line 3", "'messages' must be a list")),
    ('{"messages": [{"role": "user", "content": 5}]}', ("Line 3", "'content' must be a string or a list")),
    ('{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', ("Line 3", "'content'")),
])
def test_bad_line_names_its_number(tmp_path, bad_line, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", bad_line, {"text": "fine"}])
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(path)
    assert_one_line(excinfo, *fragments)


def test_nothing_to_train_on(tmp_path):
    records = [{"prompt": "p", "completion": ""}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(write_jsonl(tmp_path / "z.jsonl", records))
    assert_one_line(excinfo, "2 examples", "0 completion tokens", "nothing to train on")


def test_unreadable_files(tmp_path):
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a b c"}\n' * 100)[:40])
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(truncated)
    assert_one_line(excinfo, "Cannot read")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError) as excinfo:
        count_dataset(latin)
    assert_one_line(excinfo, "UTF-8")


def test_bad_tokenizer_option(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(InvalidOptionError) as excinfo:
        count_dataset(path, tokenizer=3)
    assert_one_line(excinfo, "The 'tokenizer' parameter of count_dataset", "Got int instead")
    with pytest.raises(InvalidOptionError) as excinfo:
        count_dataset(path, tokenizer=tmp_path / "missing")
    assert_one_line(excinfo, "existing directory or tokenizer.json")
    (tmp_path / "junk.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for bad in ("junk.json", "empty"):
        with pytest.raises(LorascopeError) as excinfo:
            count_dataset(path, tokenizer=tmp_path / bad)
        assert_one_line(excinfo, "Cannot load a tokenizer", bad)
