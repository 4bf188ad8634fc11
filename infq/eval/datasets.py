"""Evaluation and calibration text: named datasets, local files, token windows.

A dataset is a name (`wikitext2`, `c4`, `ptb`, `demo`; `wikitext` is an alias) or a local `.txt`
(also `.raw`) / `.jsonl` / `.parquet` file taken as it is. Named datasets come from the Hugging Face
hub through `datasets.load_dataset`, or from a local copy of one split (`data_file`) that gives
exactly the hub's records, so perplexities match published GPTQ numbers: wikitext2 joins its test
rows with "\\n\\n", ptb joins its sentences with " " (GPTQ `--new-eval`), c4 joins the first 1100
validation documents with " " and is cut to 256 * seqlen tokens (GPTQ `c4_new`). `demo` is an
offline corpus, the running interpreter's standard-library sources, split by a hash of the path.
Limits: everything is read into memory; nothing is cached between calls except the demo corpus,
and the hub is never contacted when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sysconfig
import zlib
from pathlib import Path
from types import MappingProxyType

import torch

from infq.errors import InfqError
from infq.formats.hf import hub_reachable

NAMED = ("wikitext2", "c4", "ptb", "demo")
_ALIASES = MappingProxyType({"wikitext": "wikitext2"})
_SPLITS = ("eval", "calib")
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens")  # plain text, one record per line (wiki.test.raw)
_LOCAL_SUFFIXES = (*_TEXT_SUFFIXES, ".jsonl", ".parquet")
_JOIN = MappingProxyType({"wikitext2": "\n\n", "ptb": " ", "c4": " ", "demo": "\n\n"})
_LOCAL_JOIN = "\n\n"
# Record fields of local .jsonl/.parquet copies of a named split, first match wins.
_FIELDS = MappingProxyType({"wikitext2": ("text",), "ptb": ("sentence", "text"), "c4": ("text",)})
_C4_EVAL_DOCS = 1100  # GPTQ c4_new: " ".join(valdata[:1100]["text"])
_C4_EVAL_WINDOWS = 256  # GPTQ c4_new: valenc[:, :256 * seqlen]
_DOC_TRIES = 64  # c4 calibration: documents tried per sample before using the joined text
_DEMO_EXCLUDE = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_DEMO_CAP = MappingProxyType({"eval": 1_000_000, "calib": 6_000_000})  # characters
_NAMES_HINT = "use one of wikitext2, c4, ptb, demo (alias: wikitext)"


def canonical_name(name: str) -> str:
    """A named dataset's canonical name, or `name` itself when it is an existing local file."""
    key = name.strip().lower()
    if key in NAMED:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    path = Path(name).expanduser()
    if path.is_file():
        return name
    if path.suffix.lower() in _LOCAL_SUFFIXES or os.sep in name or "/" in name:
        raise InfqError(f"data file {name!r} does not exist; check the path, or {_NAMES_HINT}")
    raise InfqError(
        f"unknown dataset {name!r}; {_NAMES_HINT}, or pass a local .txt/.jsonl/.parquet path"
    )


def load_records(dataset: str, split: str, data_file: str | None = None) -> list[str]:
    """The records of one split of `dataset` (a local file: all its records, `split` ignored)."""
    if split not in _SPLITS:
        raise InfqError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    name = canonical_name(dataset)
    if name not in NAMED:
        if data_file is not None:
            raise InfqError(
                f"--data-file only applies to named datasets; {dataset!r} is already a local"
                " file, drop --data-file"
            )
        return _local_records(Path(name).expanduser(), None)
    if name == "demo":
        if data_file is not None:
            raise InfqError("dataset 'demo' is built in (Python stdlib sources); drop --data-file")
        return list(_demo_corpus(sysconfig.get_paths()["stdlib"])[_SPLITS.index(split)])
    if data_file is not None:
        records = _local_records(_existing(data_file), name)
    else:
        records = _hub_records(name, split)
    if name == "c4" and split == "eval":
        records = records[:_C4_EVAL_DOCS]
    if not any(r.strip() for r in records):
        raise InfqError(f"dataset {name!r} ({split} split) holds no text; pass a non-empty copy")
    return records


def load_text(dataset: str, split: str = "eval", data_file: str | None = None) -> str:
    """The split's records joined the dataset's way ("\\n\\n" or " "; local files: "\\n\\n")."""
    records = load_records(dataset, split, data_file)
    return _joiner(dataset).join(records)


def eval_tokens(
    tokenizer, dataset: str, data_file: str | None = None, seqlen: int | None = None
) -> torch.LongTensor:
    """Token ids (N,) of the eval text, tokenized once; c4 is cut to 256 * seqlen tokens."""
    if seqlen is not None:
        _check_positive("seqlen", seqlen)
    ids = torch.tensor(_encode(tokenizer, load_text(dataset, "eval", data_file)), dtype=torch.long)
    if seqlen is not None:
        if canonical_name(dataset) == "c4":
            ids = ids[: _C4_EVAL_WINDOWS * seqlen]  # (N,)
        if ids.numel() < seqlen:
            raise InfqError(
                f"dataset {dataset!r} gives {ids.numel()} eval tokens, fewer than one window of"
                f" seqlen={seqlen}; use a smaller --seqlen or a larger eval text"
            )
    return ids  # (N,)


def calibration_windows(
    tokenizer,
    dataset: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_file: str | None = None,
) -> torch.LongTensor:
    """`nsamples` random windows of `seqlen` calibration tokens (nsamples, seqlen); seeded."""
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    records = load_records(dataset, "calib", data_file)
    rng = random.Random(seed)
    joiner = _joiner(dataset)
    joined: list[torch.Tensor] = []

    def joined_ids() -> torch.Tensor:  # tokenized at most once, only when needed
        if not joined:
            joined.append(_encode_pieces(tokenizer, joiner.join(records)))  # (N,)
            _check_calib_length(dataset, len(joined[0]), seqlen)
        return joined[0]

    by_document = canonical_name(dataset) == "c4"  # GPTQ samples c4 one document at a time
    rows = []
    for _ in range(nsamples):
        ids = _long_document(tokenizer, records, seqlen, rng) if by_document else None
        ids = ids if ids is not None else joined_ids()
        start = rng.randint(0, len(ids) - seqlen)
        rows.append(torch.as_tensor(ids[start : start + seqlen], dtype=torch.long))  # (seqlen,)
    return torch.stack(rows)  # (nsamples, seqlen)


def _long_document(tokenizer, records: list[str], seqlen: int, rng: random.Random):
    """GPTQ's c4 sampling: token ids of a random document with more than `seqlen` tokens."""
    for _ in range(_DOC_TRIES):
        ids = _encode(tokenizer, records[rng.randrange(len(records))])
        if len(ids) > seqlen:
            return ids
    return None


def _check_calib_length(dataset: str, n: int, seqlen: int) -> None:
    if n < seqlen:
        raise InfqError(
            f"calibration needs at least {seqlen} tokens (one window of seqlen={seqlen}), but"
            f" dataset {dataset!r} gives {n}; use a smaller --seqlen or more calibration text"
        )


def _check_positive(what: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise InfqError(f"{what} must be a positive integer, got {value!r}")


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: long eval texts exceed model_max_length on purpose; no warning wanted.
    return list(tokenizer(text, verbose=False).input_ids)


def _encode_pieces(tokenizer, text: str, piece: int = 1 << 16) -> torch.Tensor:
    """Token ids (N,) int32 of a long calibration text, tokenized in ~64 KB pieces cut at newlines.

    Tokenizing 6 MB in one call holds every token's string and offsets at once (~600 MB and
    seconds); pieces keep that to one batch. Ids equal whole-text tokenization except where a
    tokenizer treats the start of a piece specially (e.g. a prepended "▁"), which is immaterial
    for random calibration windows. Evaluation text is always tokenized whole (exact counts).
    """
    cuts, start = [], 0
    while start < len(text):
        end = min(start + piece, len(text))
        if end < len(text):
            nl = text.rfind("\n", start + 1, end)
            end = nl + 1 if nl > start else end
        cuts.append(text[start:end])
        start = end
    out = [torch.tensor(tokenizer(cuts[:1], verbose=False).input_ids[0], dtype=torch.int32)]
    for b in range(1, len(cuts), 16):
        enc = tokenizer(cuts[b : b + 16], add_special_tokens=False, verbose=False).input_ids
        out.extend(torch.tensor(ids, dtype=torch.int32) for ids in enc)
    return torch.cat(out)  # (N,)


def _joiner(dataset: str) -> str:
    return _JOIN.get(canonical_name(dataset), _LOCAL_JOIN)


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InfqError(f"data file {path!r} does not exist; check the --data-file path")
    return p


def _local_records(path: Path, name: str | None) -> list[str]:
    """Records of a local file; `name` is the named dataset it is a copy of (None: generic)."""
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        records = _txt_records(path, name)
    elif suffix == ".jsonl":
        records = _jsonl_records(path, _FIELDS.get(name, ("text",)))
    elif suffix == ".parquet":
        records = _parquet_records(path, _FIELDS.get(name, ("text",)))
    else:
        raise InfqError(
            f"data file '{path}' has unsupported extension {suffix or '(none)'!r}; use .txt (one"
            " record per line), .jsonl (field 'text') or .parquet (column 'text')"
        )
    if not any(r.strip() for r in records):
        raise InfqError(f"data file '{path}' holds no text; pass a file with at least one record")
    return records


def _txt_records(path: Path, name: str | None) -> list[str]:
    """One record per line, mapped the way the named dataset's hub builder mapped them."""
    try:
        with open(path, encoding="utf-8") as f:  # text mode: "\r\n" -> "\n", like the builders
            lines = list(f)
    except UnicodeDecodeError as exc:
        raise InfqError(f"data file '{path}' is not valid UTF-8; re-encode it as UTF-8") from exc
    if name == "wikitext2":  # the builder kept "\n" on text rows and blanked whitespace rows
        return [line if line.strip() else "" for line in lines]
    if name == "ptb":  # the builder stored line.strip()
        return [line.strip() for line in lines]
    return [line.rstrip("\n") for line in lines if line.strip()]  # generic: non-blank lines


def _jsonl_records(path: Path, fields: tuple[str, ...]) -> list[str]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InfqError(
                    f"{path}:{lineno} is not valid JSON; write one object per line"
                ) from exc
            field = next((k for k in fields if isinstance(row, dict) and k in row), None)
            if field is None or not isinstance(row[field], str):
                raise InfqError(
                    f"{path}:{lineno} has no string field {fields[0]!r}; write each line as"
                    f' {{"{fields[0]}": "..."}}'
                )
            records.append(row[field])
    return records


def _parquet_records(path: Path, fields: tuple[str, ...]) -> list[str]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        columns = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InfqError(f"data file '{path}' is not a readable parquet file ({exc})") from exc
    field = next((k for k in fields if k in columns), None)
    if field is None:
        raise InfqError(
            f"data file '{path}' has no {fields[0]!r} column (columns: {', '.join(columns)});"
            f" rename the text column to {fields[0]!r}"
        )
    return [
        v if v is not None else "" for v in pq.read_table(path, columns=[field])[field].to_pylist()
    ]


def _hub_records(name: str, split: str) -> list[str]:
    """Records of a named split from the hub; an InfqError naming the offline fix on failure."""
    calls, field, hub_split = _hub_calls(name, split)
    error = InfqError(
        f"dataset {name!r} cannot be reached (offline?); pass --data-file PATH with a local copy"
        f" of its {hub_split} split, or --dataset PATH for any local .txt/.jsonl/.parquet"
    )
    if _offline() or not hub_reachable():
        raise error
    import datasets

    last: Exception | None = None
    for args, kwargs in calls:
        try:
            return list(datasets.load_dataset(*args, **kwargs)[field])
        except Exception as exc:  # network, missing script support, auth: all mean "not here"
            last = exc
    raise error from last


def _hub_calls(name: str, split: str):
    """(load_dataset calls to try in order, record field, hub split name) for a named split."""
    if name == "wikitext2":
        hub_split = "test" if split == "eval" else "train"
        args = ("Salesforce/wikitext", "wikitext-2-raw-v1")
        return [(args, {"split": hub_split})], "text", hub_split
    if name == "ptb":
        hub_split = "test" if split == "eval" else "train"
        calls = [
            (("ptb_text_only", "penn_treebank"), {"split": hub_split}),
            (("ptb-text-only/ptb_text_only", "penn_treebank"), {"split": hub_split}),
        ]
        return calls, "sentence", hub_split
    hub_split = "validation" if split == "eval" else "train"
    shard = (
        "en/c4-validation.00000-of-00008.json.gz"
        if split == "eval"
        else "en/c4-train.00000-of-01024.json.gz"
    )
    kwargs = {"data_files": {hub_split: shard}, "split": hub_split}
    return [(("allenai/c4",), kwargs)], "text", hub_split


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


@functools.lru_cache(maxsize=2)
def _demo_corpus(stdlib: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(eval, calib) records: stdlib `*.py` files in sorted order, split by crc32(path) % 10."""
    root = Path(stdlib)
    out: tuple[list[str], list[str]] = ([], [])
    size = [0, 0]
    for rel in _demo_files(root):
        part = 0 if zlib.crc32(rel.encode("utf-8")) % 10 == 0 else 1
        if size[part] >= _DEMO_CAP[_SPLITS[part]]:
            continue
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        out[part].append(text)
        size[part] += len(text)
    if not out[0] or not out[1]:
        raise InfqError(f"the demo corpus needs the Python standard library sources in {stdlib}")
    return tuple(out[0]), tuple(out[1])


def _demo_files(root: Path) -> list[str]:
    """Sorted relative posix paths of the stdlib's `*.py` files, test and tool dirs left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _DEMO_EXCLUDE]
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)
