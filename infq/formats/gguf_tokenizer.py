"""A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata (reference §A.4.2).

`tokenizer.ggml.model == "llama"` (SentencePiece-style vocab) gets `SpmTokenizer`, which tokenizes
the way llama.cpp's SPM tokenizer does (`llm_tokenizer_spm_session` in `llama-vocab.cpp`): spaces
become "▁", a space is prefixed when `add_space_prefix` (default true), the text is split into UTF-8
characters, and adjacent symbols whose concatenation is a token are merged highest score first
(ties: leftmost), symbols that are not tokens fall back to `<0xXX>` byte tokens. This matters for
scoring llama.cpp's own files: its converter writes every score as -1000 for a vocab that came from
a `tokenizer.json` alone (no `tokenizer.model`), and then llama.cpp's merges (leftmost first) differ
from the original BPE's; infq reproduces what llama.cpp does with the file, not what the original
tokenizer did. `"gpt2"` (byte-level BPE with merges) is rebuilt by transformers' own GGUF converter.
`SpmTokenizer` has the small part of the transformers tokenizer API infq uses (call -> input_ids,
decode, special ids). Special tokens inside the text are split off first, as llama.cpp's
`tokenizer_st_partition` does: user-defined tokens always, control and unknown ones only with
`parse_special` (what llama.cpp's completion and chat do with a prompt; llama-perplexity does not),
longest token text first, and a space is prefixed to every text piece that follows a special token.
Limits: the lstrip/rstrip attributes llama.cpp gives a few tokens by name are not applied; other vocab
types (bert, t5, rwkv) are refused.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from infq.errors import InfqError

SPACE = "\u2581"  # "▁"
UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 2, 3, 4, 5, 6  # tokenizer.ggml.token_type values
_UTF8_LEN = (1,) * 12 + (2, 2, 3, 4)  # llama.cpp's unicode_len_utf8, by the lead byte's high nibble


class Encoding:
    """What `tokenizer(text).input_ids` needs."""

    def __init__(self, input_ids: Any) -> None:
        self.input_ids = input_ids

    def __getitem__(self, key: str) -> Any:
        if key != "input_ids":
            raise KeyError(key)
        return self.input_ids


class SpmTokenizer:
    """llama.cpp's SPM tokenizer over a GGUF vocab: tokens, scores, token types, special ids."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float] | None, types: Sequence[int] | None,
                 bos: int | None, eos: int | None, unk: int | None, pad: int | None = None,
                 add_bos: bool = True, add_eos: bool = False, add_space_prefix: bool = True,
                 chat_template: str | None = None) -> None:
        n = len(tokens)
        self.tokens = list(tokens)
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        self.types = [int(t) for t in types] if types is not None else [1] * n
        if len(self.scores) != n or len(self.types) != n:
            raise InfqError("GGUF tokenizer metadata: tokens, scores and token types differ in length; re-export it")
        for name, tid in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad)):
            if tid is not None and not 0 <= tid < n:
                raise InfqError(f"GGUF tokenizer metadata: {name} token id {tid} is outside the {n} tokens")
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = bos, eos, unk, pad
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self.chat_template = chat_template
        self.ids: dict[bytes, int] = {}
        for i, t in enumerate(self.tokens):
            self.ids.setdefault(t.encode("utf-8"), i)  # llama.cpp keeps the first id of a duplicate text
        self.byte_ids = [self._byte_id(b) for b in range(256)]
        # (text, id, control-or-unknown) of the tokens split off before SPM, longest text first
        self.specials = sorted(((t, i, self.types[i] != USER_DEFINED) for i, t in enumerate(self.tokens)
                                if self.types[i] in (UNKNOWN, CONTROL, USER_DEFINED) and t),
                               key=lambda e: -len(e[0].encode("utf-8")))
        self.model_max_length = 1 << 62

    def _byte_id(self, b: int) -> int:
        tid = self.ids.get(f"<0x{b:02X}>".encode())
        if tid is None:
            tid = self.ids.get(bytes([b]))
        if tid is None:
            tid = self.unk_token_id if self.unk_token_id is not None else 0
        return tid

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.tokens[self.eos_token_id]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, parse_special: bool = False,
                 **_: Any) -> Encoding:
        if isinstance(text, str):
            return Encoding(self.encode(text, add_special_tokens, parse_special))
        return Encoding([self.encode(t, add_special_tokens, parse_special) for t in text])

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        out = [self.bos_token_id] if add_special_tokens and self.add_bos and self.bos_token_id is not None else []
        after_special = True  # the first piece gets the space prefix, as does each piece after a special token
        for piece in self.partition(text, parse_special) if text else ():
            if isinstance(piece, int):
                out.append(piece)
                after_special = True
                continue
            prefix = " " if self.add_space_prefix and after_special else ""
            out += self._spm((prefix + piece).replace(" ", SPACE).encode("utf-8"))
            after_special = False
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            out.append(self.eos_token_id)
        return out

    def partition(self, text: str, parse_special: bool = False) -> list[str | int]:
        """`text` as text pieces and special token ids: each special token in turn (longest first)
        is split out of the pieces that are still text, every occurrence left to right."""
        pieces: list[str | int] = [text]
        for tok, tid, control in self.specials:
            if control and not parse_special:
                continue
            if not any(isinstance(p, str) and tok in p for p in pieces):
                continue
            split: list[str | int] = []
            for p in pieces:
                if isinstance(p, int) or tok not in p:
                    split.append(p)
                    continue
                for j, part in enumerate(p.split(tok)):
                    if j:
                        split.append(tid)
                    if part:
                        split.append(part)
            pieces = split
        return pieces

    def _spm(self, data: bytes) -> list[int]:
        """The bigram merge loop of `llm_tokenizer_spm_session::tokenize` over UTF-8 characters."""
        starts: list[int] = []
        i, n = 0, len(data)
        while i < n:  # utf-8 character boundaries (llama.cpp's unicode_len_utf8 on the lead byte)
            starts.append(i)
            i += _UTF8_LEN[data[i] >> 4]
        m = len(starts)
        start = starts
        size = [min(n, s2) - s1 for s1, s2 in zip(starts, starts[1:] + [n], strict=True)]
        nxt = list(range(1, m)) + [-1]
        prv = list(range(-1, m - 1))
        ids, scores = self.ids, self.scores
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged size)

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = size[left] + size[right]
            tid = ids.get(data[start[left]:start[left] + s])
            if tid is not None:
                heap.append((-scores[tid], left, right, s))

        for k in range(1, m):
            add(k - 1, k)
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, s = pop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != s:
                continue  # stale: one side was merged since
            size[left] = s
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            for a, b in ((prv[left], left), (left, nxt[left])):
                if a >= 0 and b >= 0:
                    s2 = size[a] + size[b]
                    tid = ids.get(data[start[a]:start[a] + s2])
                    if tid is not None:
                        push(heap, (-scores[tid], a, b, s2))
        out: list[int] = []
        k = 0 if m else -1
        while k != -1:
            piece = data[start[k]:start[k] + size[k]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:  # merged symbols are always tokens; a lone character that is not becomes bytes
                out.extend(self.byte_ids[b] for b in piece)
            k = nxt[k]
        return out

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        buf = bytearray()
        for i in ids:
            t = self.types[i]
            if skip_special_tokens and t in (CONTROL, UNUSED):
                continue
            text = self.tokens[i]
            if t == BYTE and len(text) == 6 and text.startswith("<0x"):
                buf.append(int(text[3:5], 16))
            else:
                buf += text.replace(SPACE, " ").encode("utf-8")
        out = buf.decode("utf-8", errors="replace")
        return out[1:] if self.add_space_prefix and out.startswith(" ") else out


def _get(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = meta.get(f"tokenizer.ggml.{key}")
    return default if v is None else v


def tokenizer_from_gguf(path: Path, meta: Mapping[str, Any]) -> Any:
    """The tokenizer the GGUF file describes; InfqError when it holds none infq can rebuild."""
    model = _get(meta, "model")
    tokens = _get(meta, "tokens")
    if model is None or not tokens:
        raise InfqError(f"{path} holds no tokenizer (tokenizer.ggml.model/tokens); re-export it with its vocab")
    if model == "llama":
        return SpmTokenizer(
            tokens, _get(meta, "scores"), _get(meta, "token_type"),
            bos=_get(meta, "bos_token_id", 1), eos=_get(meta, "eos_token_id", 2), unk=_get(meta, "unknown_token_id", 0),
            pad=_get(meta, "padding_token_id"), add_bos=bool(_get(meta, "add_bos_token", True)),
            add_eos=bool(_get(meta, "add_eos_token", False)), add_space_prefix=bool(_get(meta, "add_space_prefix", True)),
            chat_template=meta.get("tokenizer.chat_template"))
    if model == "gpt2":
        tok = hf_tokenizer_from_gguf(path)
        if not getattr(tok, "chat_template", None) and meta.get("tokenizer.chat_template"):
            tok.chat_template = meta["tokenizer.chat_template"]
        return tok
    raise InfqError(f"{path}: tokenizer type {model!r} is not supported; infq reads 'llama' (SentencePiece) and "
                    "'gpt2' (BPE) vocabs")


def hf_tokenizer_from_gguf(path: Path) -> Any:
    """transformers' own fast tokenizer for the GGUF file (what `--to hf` saves)."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for vocabs it cannot convert
        raise InfqError(f"{path}: transformers cannot rebuild its tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); re-export the GGUF with a standard vocab") from None
    tok.model_max_length = 1 << 62
    return tok


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SPM's score order: every split (a, b) of a normal token t into two
    tokens, ranked by t's score (highest first), ties by t's id, then by a's id."""
    index: dict[str, int] = {}
    for i, t in enumerate(tokens):
        index.setdefault(t, i)
    ranked = []
    for i, t in enumerate(tokens):
        if types[i] not in (1, 4) or len(t) < 2:  # NORMAL / USER_DEFINED pieces only
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in index and b in index:
                ranked.append((-scores[i], i, index[a], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def save_hf_tokenizer(path: Path, meta: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json for the GGUF vocab into `out_dir`; warnings.

    "llama": a byte-fallback BPE over "▁" (the Llama-2 fast tokenizer layout) with the file's merges
    when it carries them (infq writes them), else merges ranked by score (exact for distinct scores;
    when the scores tie, as llama.cpp's converter writes them for tokenizer.json-only vocabs, the
    order falls back to token ids and can differ from llama.cpp's leftmost-first merging).
    "gpt2": transformers' own GGUF conversion, saved."""
    if _get(meta, "model") is None or not _get(meta, "tokens"):
        return [f"{path} holds no tokenizer: the HF folder has none; copy the original model's tokenizer files into it"]
    if _get(meta, "model") != "llama":
        hf_tokenizer_from_gguf(path).save_pretrained(str(out_dir))
        return []
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    spm = tokenizer_from_gguf(path, meta)
    assert isinstance(spm, SpmTokenizer)
    warnings: list[str] = []
    if _get(meta, "merges"):
        merges = [tuple(m.split(" ", 1)) for m in _get(meta, "merges")]
    else:
        merges = _spm_merges(spm.tokens, spm.scores, spm.types)
        if len(set(spm.scores)) < len(spm.scores) // 2:
            warnings.append("the vocab's scores are mostly tied (llama.cpp's converter writes -1000 for tokenizer.json "
                            "vocabs): the HF tokenizer's merge order is a reconstruction and may split some text "
                            "differently from llama.cpp")
    vocab: dict[str, int] = {}
    for i, t in enumerate(spm.tokens):
        vocab.setdefault(t, i)
    unk = spm.tokens[spm.unk_token_id] if spm.unk_token_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    norm = [normalizers.Prepend(SPACE)] if spm.add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if spm.add_space_prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(spm.tokens, spm.types, strict=True) if k in (CONTROL, UNKNOWN)])
    bos = spm.bos_token
    if spm.add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, spm.bos_token_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=spm.eos_token, unk_token=unk,
        pad_token=None if spm.pad_token_id is None else spm.tokens[spm.pad_token_id],
        add_bos_token=spm.add_bos, add_eos_token=spm.add_eos, clean_up_tokenization_spaces=False)
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out_dir))
    return warnings
