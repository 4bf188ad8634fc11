"""Tests for infq.eval.datasets: local files, named-split mappings, demo split, token windows.

Oracles are built independently in each test: expected record lists written out by hand, the
hub builders' line rules re-applied to a fake file, the demo split recomputed from the stdlib
tree, and a byte tokenizer whose ids are known in closed form (BOS, then 3 + each UTF-8 byte).
Offline throughout: the hub is replaced by a stub or blocked by the offline environment variables.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from infq.errors import InfqError
from infq.eval import datasets as ds

BOS = 1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def byte_tok():
    """One token per UTF-8 byte (id 3 + byte) after a BOS (id 1): ids known in closed form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + b for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _ids(text: str) -> list[int]:
    return [BOS] + [3 + b for b in text.encode("utf-8")]


def _is_slice(window: list[int], ids: list[int]) -> bool:
    n = len(window)
    return any(ids[i : i + n] == window for i in range(len(ids) - n + 1))


def _write_parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- local files, taken as they are -------------------------------------------------------------


def test_txt_records_are_non_blank_lines_joined_by_blank_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\n  \nsecond  line \nthird\n", encoding="utf-8")
    assert ds.canonical_name(str(path)) == str(path)
    assert ds.load_records(str(path), "eval") == ["first line", "second  line ", "third"]
    assert ds.load_text(str(path), "calib") == "first line\n\nsecond  line \n\nthird"


def test_jsonl_and_parquet_records_are_the_text_field(tmp_path):
    docs = ["héllo\nworld", "", "tab\there"]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    parquet = _write_parquet(tmp_path / "d.parquet", text=docs, url=["a", "b", "c"])
    for path in (jsonl, parquet):
        assert ds.load_records(str(path), "eval") == docs
        assert ds.load_text(str(path)) == "héllo\nworld\n\n\n\ntab\there"


def test_eval_tokens_are_the_tokenizer_ids_of_the_whole_text(tmp_path, byte_tok):
    path = tmp_path / "t.txt"
    path.write_text("αβ line\nsecond\n", encoding="utf-8")
    ids = ds.eval_tokens(byte_tok, str(path))
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == _ids("αβ line\n\nsecond")


# --- named datasets from local copies -----------------------------------------------------------


def test_wikitext_local_copy_gives_hub_records(tmp_path):
    # The hub builder: `row if row.strip() else ""` over the raw file's lines, "\n" kept.
    raw = [" \n", " = Valkyria = \n", " \n", " It is a game . \n", "\t \n", " = = Plot = = \n"]
    path = tmp_path / "wiki.test.raw"
    path.write_text("".join(raw) + " last without newline", encoding="utf-8")
    hub_rows = ["", " = Valkyria = \n", "", " It is a game . \n", "", " = = Plot = = \n"]
    hub_rows.append(" last without newline")
    records = ds.load_records("wikitext2", "eval", data_file=str(path))
    assert records == hub_rows and len(records) == len(raw) + 1
    expected = (
        "\n\n = Valkyria = \n\n\n\n\n It is a game . \n\n\n\n\n = = Plot = = \n\n\n"
        " last without newline"
    )
    assert ds.load_text("wikitext", data_file=str(path)) == expected
    parquet = _write_parquet(tmp_path / "test.parquet", text=hub_rows)  # a copy of the hub rows
    assert ds.load_text("wikitext2", data_file=str(parquet)) == expected


def test_ptb_sentences_are_stripped_and_joined_by_space(tmp_path):
    path = tmp_path / "ptb.test.txt"
    path.write_text(" no it was n't black monday \n but while the \n", encoding="utf-8")
    assert ds.load_text("ptb", "eval", str(path)) == "no it was n't black monday but while the"
    jsonl = _write_jsonl(tmp_path / "ptb.jsonl", [{"sentence": "a b"}, {"sentence": "c"}])
    assert ds.load_text("ptb", "calib", str(jsonl)) == "a b c"


def test_c4_eval_joins_first_1100_docs_and_cuts_to_256_windows(tmp_path, byte_tok):
    docs = [f"doc {i} é" for i in range(1200)]
    path = _write_parquet(tmp_path / "c4.parquet", text=docs)
    expected = " ".join(docs[:1100])
    assert ds.load_text("c4", "eval", str(path)) == expected
    assert len(ds.load_records("c4", "calib", str(path))) == 1200
    assert ds.eval_tokens(byte_tok, "c4", str(path)).tolist() == _ids(expected)
    cut = ds.eval_tokens(byte_tok, "c4", str(path), seqlen=8)
    assert cut.tolist() == _ids(expected)[: 256 * 8]


# --- the demo corpus ----------------------------------------------------------------------------


def _demo_oracle() -> tuple[list[str], list[str]]:
    """The demo split recomputed from the spec: sorted stdlib *.py, crc32 % 10, size caps."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not skip & set(p.relative_to(root).parts[:-1])
    )
    out = {"eval": [], "calib": []}
    caps = {"eval": 1_000_000, "calib": 6_000_000}
    for rel in rels:
        split = "eval" if zlib.crc32(rel.encode()) % 10 == 0 else "calib"
        if sum(map(len, out[split])) < caps[split]:
            out[split].append((root / rel).read_text(encoding="utf-8", errors="replace"))
    return out["eval"], out["calib"]


def test_demo_split_matches_spec_and_is_disjoint():
    eval_recs = ds.load_records("demo", "eval")
    calib_recs = ds.load_records("demo", "calib")
    assert (eval_recs, calib_recs) == _demo_oracle()
    assert ds.load_records("demo", "eval") == eval_recs  # deterministic
    assert len(eval_recs) > 10 and len(calib_recs) > 10
    big = {r for r in eval_recs if len(r) > 500}
    assert big and not big & set(calib_recs)
    assert 500_000 < len(ds.load_text("demo", "eval")) < 1_200_000
    assert 3_000_000 < len(ds.load_text("demo", "calib")) < 6_500_000


# --- calibration windows ------------------------------------------------------------------------


def test_calibration_windows_are_seeded_slices_of_the_text(tmp_path, byte_tok):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"line {i} of text\n" for i in range(200)), encoding="utf-8")
    ids = _ids(ds.load_text(str(path)))
    a = ds.calibration_windows(byte_tok, str(path), nsamples=6, seqlen=32, seed=3)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, ds.calibration_windows(byte_tok, str(path), 6, 32, seed=3))
    assert not torch.equal(a, ds.calibration_windows(byte_tok, str(path), 6, 32, seed=4))
    assert all(_is_slice(row, ids) for row in a.tolist())


def test_c4_calibration_samples_long_documents(tmp_path, byte_tok):
    docs = ["short"] * 20 + [f"a long document number {i} " * 8 for i in range(5)]
    path = _write_jsonl(tmp_path / "c4.jsonl", [{"text": d} for d in docs])
    w = ds.calibration_windows(byte_tok, "c4", 8, 64, seed=1, data_file=str(path))
    assert w.shape == (8, 64)
    assert torch.equal(w, ds.calibration_windows(byte_tok, "c4", 8, 64, 1, str(path)))
    assert all(any(_is_slice(row, _ids(d)) for d in docs[20:]) for row in w.tolist())


def test_c4_calibration_falls_back_to_joined_text(tmp_path, byte_tok):
    docs = [f"doc {i}" for i in range(50)]  # every document shorter than a window
    path = _write_jsonl(tmp_path / "c4.jsonl", [{"text": d} for d in docs])
    w = ds.calibration_windows(byte_tok, "c4", 3, 40, seed=0, data_file=str(path))
    assert all(_is_slice(row, _ids(" ".join(docs))) for row in w.tolist())


# --- hub access (stubbed) -----------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("infq.eval.datasets.hub_reachable", lambda: True)
    return monkeypatch


def test_hub_calls_name_the_gptq_splits(online):
    import datasets

    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a\n", ""], "sentence": ["s1", "s2"]}

    online.setattr(datasets, "load_dataset", fake_load)
    assert ds.load_text("wikitext2") == "a\n\n\n"
    assert ds.load_text("ptb", "calib") == "s1 s2"
    ds.load_records("c4", "eval")
    assert calls[0] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert calls[1] == (("ptb_text_only", "penn_treebank"), {"split": "train"})
    shard = "en/c4-validation.00000-of-00008.json.gz"
    assert calls[2] == (
        ("allenai/c4",),
        {"data_files": {"validation": shard}, "split": "validation"},
    )


def test_unreachable_hub_names_the_local_fixes(online):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("no route to host")

    online.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(
        InfqError, match=r"cannot be reached.*--data-file.*its test split.*--dataset"
    ):
        ds.load_text("wikitext2")
    with pytest.raises(InfqError, match="'ptb' cannot be reached"):  # both ptb repos tried
        ds.load_text("ptb")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_env_fails_without_calling_the_hub(online, var):
    import datasets

    def must_not_run(*args, **kwargs):
        raise AssertionError("load_dataset called while offline")

    online.setattr(datasets, "load_dataset", must_not_run)
    online.setenv(var, "1")
    with pytest.raises(
        InfqError, match=r"'c4' cannot be reached.*validation split.*--dataset PATH"
    ):
        ds.load_records("c4", "eval")


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_name_lists_the_names_and_local_paths():
    with pytest.raises(InfqError, match=r"wikitext2, c4, ptb, demo.*\.txt/\.jsonl/\.parquet"):
        ds.canonical_name("wikitext103")
    assert ds.canonical_name("WikiText") == "wikitext2"


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".txt", "holds no text"),
        ("\n  \n\n", ".txt", "holds no text"),
        ('{"body": "x"}\n', ".jsonl", "no string field 'text'"),
        ("not json\n", ".jsonl", ":1 is not valid JSON"),
        ("a,b\n", ".csv", "unsupported extension '.csv'"),
    ],
)
def test_bad_local_files(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InfqError, match=message):
        ds.load_text(str(path))


def test_parquet_without_text_column(tmp_path):
    path = _write_parquet(tmp_path / "d.parquet", body=["x"], url=["u"])
    with pytest.raises(InfqError, match=r"no 'text' column \(columns: body, url\)"):
        ds.load_records(str(path), "eval")


def test_missing_files_and_misused_arguments(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(InfqError, match="does not exist"):
        ds.load_text(missing)
    with pytest.raises(InfqError, match="does not exist; check the --data-file"):
        ds.load_text("wikitext2", data_file=missing)
    real = tmp_path / "real.txt"
    real.write_text("x\n", encoding="utf-8")
    with pytest.raises(InfqError, match="only applies to named datasets"):
        ds.load_text(str(real), data_file=str(real))
    with pytest.raises(InfqError, match="'demo' is built in"):
        ds.load_text("demo", data_file=str(real))
    with pytest.raises(InfqError, match="split must be one of eval, calib"):
        ds.load_records("demo", "test")


def test_too_few_tokens_say_how_many(tmp_path, byte_tok):
    path = tmp_path / "short.txt"
    path.write_text("abc\n", encoding="utf-8")  # 4 tokens: BOS + 3 bytes
    with pytest.raises(InfqError, match=r"gives 4 eval tokens.*seqlen=16"):
        ds.eval_tokens(byte_tok, str(path), seqlen=16)
    with pytest.raises(InfqError, match=r"at least 16 tokens.*gives 4"):
        ds.calibration_windows(byte_tok, str(path), nsamples=2, seqlen=16)
    with pytest.raises(InfqError, match="nsamples must be a positive integer"):
        ds.calibration_windows(byte_tok, str(path), nsamples=0, seqlen=2)
