"""Calibration sources (default mix, local .jsonl/.json/.parquet/.txt, `datasets` on a local folder) and rows."""

import json
import subprocess
import sys

import pytest
import torch

from quantkit.calib.rows import build_rows, chat_as_text
from quantkit.calib.sources import (
    DEFAULT_MIX,
    DEFAULT_MIX_NAME,
    Calibration,
    Document,
    Source,
    default_calib_dir,
    default_images,
    load_calibration,
    load_hub,
)
from quantkit.errors import QuantkitError

BOS = 256


def encode(text: str) -> list[int]:
    """Byte-level stand-in for a tokenizer: BOS then UTF-8 bytes."""
    return [BOS, *text.encode("utf-8")]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _decode(row) -> bytes:
    return bytes(t for t in row.tolist() if t != BOS)


def test_jsonl_rows_are_deterministic_and_seeded(tmp_path):
    docs = [{"text": f"document {i}: " + "lorem ipsum " * (i + 3), "id": i} for i in range(20)]
    path = _jsonl(tmp_path / "data.jsonl", docs)
    calib = load_calibration(str(path))
    assert len(calib.sources[0].documents) == 20
    a = build_rows(calib, encode, rows=4, seq_len=64, seed=1)
    b = build_rows(load_calibration(str(path)), encode, rows=4, seq_len=64, seed=1)
    c = build_rows(calib, encode, rows=4, seq_len=64, seed=2)
    assert a.ids.shape == (4, 64) and a.ids.dtype == torch.int64
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    # rows are a concatenation of whole documents (only the last one cut), each starting with BOS
    assert int(a.ids[0, 0]) == BOS
    assert b"document" in _decode(a.ids[0])
    assert a.provenance["rows"] == 4 and a.provenance["seq_len"] == 64 and a.provenance["seed"] == 1
    assert a.provenance["sources"]["data.jsonl"]["tokens"] == 4 * 64


def test_small_dataset_is_reused(tmp_path):
    path = _jsonl(tmp_path / "tiny.jsonl", [{"text": "short"}, {"text": "texts"}])
    rows = build_rows(load_calibration(str(path)), encode, rows=3, seq_len=50, seed=0)
    assert rows.ids.shape == (3, 50)
    assert rows.provenance["sources"]["tiny.jsonl"]["passes"] > 1


def test_txt_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\n<|endofdoc|>\nsecond doc\n<|endofdoc|>\n\n", encoding="utf-8")
    docs = load_calibration(str(tmp_path / "a.txt")).sources[0].documents
    assert [d.text for d in docs] == ["first doc", "second doc"]

    table = pa.table({"content": ["alpha text", None, "", "gamma text"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "b.parquet")
    docs = load_calibration(str(tmp_path / "b.parquet"), text_field="content").sources[0].documents
    assert [d.text for d in docs] == ["alpha text", "gamma text"]  # nulls and empty strings dropped

    (tmp_path / "c.json").write_text(json.dumps([{"text": "from json"}]), encoding="utf-8")
    assert load_calibration(str(tmp_path / "c.json")).sources[0].documents == [Document(text="from json")]

    # a folder: every supported file in name order, as one source
    (tmp_path / "b.parquet").unlink()
    calib = load_calibration(str(tmp_path))
    assert [d.text for d in calib.sources[0].documents] == ["first doc", "second doc", "from json"]
    assert calib.extra["files"] == ["a.txt", "c.json"]


def test_missing_text_field_is_one_line_error(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"content": "x", "meta": 1}])
    with pytest.raises(QuantkitError) as err:
        load_calibration(str(path))
    msg = str(err.value)
    assert "no field 'text'" in msg and "content, meta" in msg and "--text-field" in msg and "\n" not in msg
    assert load_calibration(str(path), text_field="content").sources[0].documents[0].text == "x"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["y"]}), tmp_path / "data.parquet")
    with pytest.raises(QuantkitError, match=r"data.parquet: no field 'text' .*\(fields: body\)"):
        load_calibration(str(tmp_path / "data.parquet"))


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n{"text": "   "}\n'])
def test_empty_dataset_is_one_line_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(QuantkitError, match="is empty"):
        load_calibration(str(path))


def test_bad_inputs(tmp_path):
    with pytest.raises(QuantkitError, match="not found"):
        load_calibration(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(QuantkitError, match="bad.jsonl:2: invalid JSON"):
        load_calibration(str(tmp_path / "bad.jsonl"))
    (tmp_path / "data.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(QuantkitError, match="unsupported calibration file type"):
        load_calibration(str(tmp_path / "data.csv"))
    calib = load_calibration(str(_jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])))
    with pytest.raises(QuantkitError, match="--rows"):
        build_rows(calib, encode, rows=0, seq_len=16)
    nothing = Calibration("x", [Source("x", [Document(text="hello")])])
    with pytest.raises(QuantkitError, match="encode to no tokens"):
        build_rows(nothing, lambda text: [], rows=1, seq_len=4)


def test_chat_records_use_the_chat_encoder(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    conv = {
        "messages": [
            {"role": "user", "content": "What time is it?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abcDEF123", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_time", "content": "10:42"},
            {"role": "assistant", "content": "It is 10:42."},
        ],
        "tools": tools,
    }  # fmt: skip
    calib = load_calibration(str(_jsonl(tmp_path / "chat.jsonl", [conv])))
    doc = calib.sources[0].documents[0]
    assert doc.messages == conv["messages"] and doc.tools == tools
    seen = []

    def encode_chat(messages, tools_):
        seen.append((len(messages), tools_))
        return [7] * 10

    rows = build_rows(calib, encode, rows=1, seq_len=25, encode_chat=encode_chat)
    assert seen[0] == (4, tools) and rows.ids.tolist() == [[7] * 25]
    # without a chat encoder the conversation is rendered as text, tool calls included
    text = chat_as_text(doc)
    assert "What time is it?" in text and "get_time" in text and "It is 10:42." in text
    assert b"It is 10:42." in _decode(build_rows(calib, encode, rows=1, seq_len=200).ids[0])


def test_default_mix_covers_every_source():
    calib = load_calibration(None)
    assert calib.dataset == DEFAULT_MIX_NAME
    assert [s.name for s in calib.sources] == [name for name, _ in DEFAULT_MIX]
    assert all(len(s.documents) >= 4 for s in calib.sources)
    assert sum(1 for d in calib.sources[0].documents if d.messages and d.tools) >= 8  # tool-use conversations
    rows = build_rows(calib, encode, rows=2, seq_len=2048, seed=0)
    per_source = rows.provenance["sources"]
    assert set(per_source) == {name for name, _ in DEFAULT_MIX}  # even 2 rows mix every file
    assert sum(s["tokens"] for s in per_source.values()) == 2 * 2048
    assert per_source["chat.jsonl"]["tokens"] == pytest.approx(0.25 * 4096, abs=1)
    text = b"".join(_decode(r) for r in rows.ids).decode("utf-8", errors="ignore")
    for marker in ("的", "の", "는", "и"):  # Chinese, Japanese, Korean, Russian text made it into the rows
        assert marker in text


def test_default_mix_chat_is_valid_mistral_format():
    """Every bundled conversation encodes with mistral-common's own validation (finetuning mode, tools included)."""
    mc = pytest.importorskip("mistral_common")
    from pathlib import Path

    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tekken = Path(mc.__file__).parent / "data" / "tekken_240911.json"
    if not tekken.is_file():
        pytest.skip("mistral-common ships no tekken file in this version")
    tok = MistralTokenizer.from_file(str(tekken), mode=ValidationMode.finetuning)

    def encode_chat(messages, tools):
        return tok.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens

    calib = load_calibration(None)
    chats = calib.sources[0].documents
    n_tokens = sum(len(encode_chat(d.messages, d.tools)) for d in chats)
    assert n_tokens > 10_000
    rows = build_rows(calib, lambda t: tok.instruct_tokenizer.tokenizer.encode(t, bos=True, eos=False), rows=2,
                      seq_len=512, encode_chat=encode_chat)  # fmt: skip
    assert rows.ids.shape == (2, 512) and int(rows.ids.max()) < tok.instruct_tokenizer.tokenizer.n_words


def test_hub_path_uses_datasets_on_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"body": f"row {i}"} for i in range(5)])
    docs = load_hub(str(folder), split="train", text_field="body")
    assert [d.text for d in docs] == [f"row {i}" for i in range(5)]
    assert len(load_hub(str(folder), split="train", text_field="body", max_chars=10)) == 2
    with pytest.raises(QuantkitError, match="no field 'text'"):
        load_hub(str(folder), split="train", text_field="text")
    with pytest.raises(QuantkitError, match="cannot load calibration dataset"):
        load_hub(str(folder), split="validation", text_field="body")


def test_default_images_are_regenerated_identically(tmp_path):
    shipped = default_images()
    assert len(shipped) == 8
    script = default_calib_dir() / "build_images.py"
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    from PIL import Image

    for path in shipped:
        a, b = (tmp_path / d / path.name for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
        with Image.open(path) as im, Image.open(a) as regen:
            assert im.size == regen.size and im.mode == regen.mode
