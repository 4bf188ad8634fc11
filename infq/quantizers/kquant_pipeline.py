"""`infq quantize --method kquant`: a Hugging Face llama model -> one self-contained GGUF file.

The run, in order: check the request (mix name, `--tensor-type` overrides, imatrix flags), open
the checkpoint memory-mapped, get the importance matrix (`--imatrix F` reads a llama.cpp .dat/.gguf
file and checks it covers every block linear with the right sizes; by default it is collected
through the shared calibration driver's `collect_stats`, one full-precision forward per block as
llama-imatrix does; `--no-imatrix` skips it), plan each tensor's GGML type with the mix rules
(`kquant_mix`, fallbacks and overrides reported), then stream the tensors into the GGUF writer one
at a time: each 2-D weight goes through `kquants.quantize_kquant` with its imatrix row, 1-D tensors
stay F32. The file carries llama metadata, tokenizer metadata (`formats.gguf_vocab`),
`general.file_type` as llama.cpp sets it, and llama.cpp's `quantize.imatrix.*` keys. It is written
to `<out>.tmp` and renamed when complete; an existing output (or `--imatrix-out` file) is replaced
only with `force`. Limits: llama-architecture models (GGUF writer); no `--resume` (the encode is
one pass over the weights, the imatrix can be saved and reused with `--imatrix-out`/`--imatrix`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infq.errors import InfqError
from infq.quantizers import kquant_mix
from infq.quantizers.calibrate import LayerStats
from infq.quantizers.scheme import QuantConfig

_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8, "Q4_0": 4}


@dataclass(frozen=True)
class KquantOptions:
    mix: str
    overrides: tuple[tuple[str, str], ...]
    config: QuantConfig
    device: str = "cpu"


def check_request(req: Any) -> KquantOptions:
    """Refuse flags that do not apply to kquant and contradictory imatrix flags, before any work."""
    given = [flag for flag, bad in (
        ("--bits", req.bits is not None), ("--group-size", req.group_size is not None),
        ("--sym/--asym", req.sym is not None), ("--desc-act", req.desc_act), ("--static-groups", req.static_groups),
        ("--lm-head", req.lm_head), ("--skip", bool(req.skip)), ("--resume", req.resume),
        ("--weight-scale", req.weight_scale is not None), ("--act-scheme", req.act_scheme is not None),
        ("--act-percentile", req.act_percentile is not None),
    ) if bad]
    if given:
        raise InfqError(f"{given[0]} does not apply to --method kquant; choose the mix with --type (e.g. Q4_K_M) "
                        "and per-tensor types with --tensor-type REGEX=TYPE")
    if req.format not in ("auto", "gguf"):
        raise InfqError(f"--method kquant writes GGUF; drop --format {req.format}")
    if req.imatrix and req.no_imatrix:
        raise InfqError("--imatrix and --no-imatrix contradict each other; keep one")
    if req.imatrix_out and req.no_imatrix:
        raise InfqError("--imatrix-out saves the importance matrix, which --no-imatrix skips; drop one")
    mix = (req.type or "Q4_K_M").upper()
    default = kquant_mix.default_type(mix)  # InfqError listing the mixes
    config = QuantConfig(method="kquant", bits=_BITS[default], group_size=-1, nsamples=req.nsamples,
                         seqlen=req.seqlen)
    return KquantOptions(mix, kquant_mix.parse_overrides(req.tensor_types), config, req.device)


def _layer_order(name: str) -> tuple[int, str]:
    """llama.cpp's loader order: tensors outside blocks first, then by layer number, then by name."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


def quantize_kquant_model(req: Any, bar: Any = None) -> dict[str, Any]:
    """Quantize `req.model` with the K-quant mix `req.type` into the GGUF file `req.out`."""
    from infq.formats.gguf import _check_llama, gguf_name
    from infq.formats.hf import Checkpoint, read_config, resolve_model
    from infq.runtime.arch import ModelConfig
    from infq.runtime.loader import check_checkpoint

    start = time.perf_counter()
    opts = check_request(req)
    src = resolve_model(req.model)
    hf_config = read_config(src)
    if hf_config.get("quantization_config"):
        raise InfqError(f"{src} is already quantized; quantize the full-precision model instead")
    cfg = ModelConfig.from_hf(hf_config)
    meta_config = {**hf_config, "rope_theta": cfg.rope_theta, "head_dim": cfg.head_dim}
    _check_llama(meta_config)
    ckpt = Checkpoint(src, mmap=True)
    check_checkpoint(ckpt, cfg)
    out = Path(req.out) if req.out else Path.cwd() / f"{src.name if src.name != 'demo' else 'infq-demo'}-{opts.mix}.gguf"
    for path, flag in ((out, "--out"), (Path(req.imatrix_out) if req.imatrix_out else None, "--imatrix-out")):
        if path is not None and path.exists() and not req.force:
            raise InfqError(f"{path} already exists; pass --force to replace it or choose another {flag}")
    names = sorted((n for n in ckpt.keys() if not n.endswith("rotary_emb.inv_freq")), key=lambda n: _layer_order(gguf_name(n)))
    shapes = {gguf_name(n): tuple(ckpt.shape(n)) for n in names}
    linears = {f"{cfg.arch.linear_name(i, r)}.weight": ckpt.shape(f"{cfg.arch.linear_name(i, r)}.weight")[1]
               for i in range(cfg.num_layers) for r in cfg.arch.linears}
    im, im_info = _imatrix(req, opts, src, cfg, ckpt, {gguf_name(n): size for n, size in linears.items()}, bar)
    model = kquant_mix.ModelShape(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, has_output=cfg.arch.lm_head in ckpt)
    plan = kquant_mix.plan_mix(opts.mix, shapes, model, im is not None, opts.overrides)
    summary = _encode(out, src, meta_config, ckpt, names, plan, im, im_info, opts, bar)
    return {
        "out": str(out), "method": "kquant", "type": opts.mix, "file_type": plan.file_type, "format": "gguf",
        "bits_per_weight": round(plan.bits_per_weight, 4), "types": plan.type_counts(),
        "fallbacks": plan.fallbacks, "overrides": plan.overrides, "imatrix": im_info,
        "bytes_before": ckpt.file_bytes(), "bytes_after": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 3), **summary,
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> int:
    from infq.eval.throughput import peak_rss_bytes

    return peak_rss_bytes()


def _imatrix(req: Any, opts: KquantOptions, src: Path, cfg: Any, ckpt: Any, expected: dict[str, int],
             bar: Any) -> tuple[Any, dict[str, Any]]:
    """The importance matrix (read, collected or none) and what the report says about it."""
    from infq.formats.imatrix import read_imatrix, write_imatrix

    if req.no_imatrix:
        return None, {"source": None}
    t0 = time.perf_counter()
    if req.imatrix:
        im = read_imatrix(req.imatrix)
        im.check_against(expected, str(req.imatrix))
        source = str(req.imatrix)
    else:
        im = _collect(req, opts, src, cfg, ckpt, bar)
        source = "collected"
    info = {"source": source, "entries": len(im.sums), "chunks": im.chunk_count, "chunk_size": im.chunk_size,
            "datasets": im.datasets, "seconds": round(time.perf_counter() - t0, 3)}
    if req.imatrix_out:
        info["saved_to"] = str(write_imatrix(req.imatrix_out, im))
    return im, info


def _collect(req: Any, opts: KquantOptions, src: Path, cfg: Any, ckpt: Any, bar: Any) -> Any:
    """mean x^2 of every block linear's inputs over the calibration windows, full precision."""
    from infq.formats.gguf import gguf_name
    from infq.formats.imatrix import Imatrix
    from infq.quantizers.api import _HALF, _default_dataset, _windows, method_fn
    from infq.quantizers.calibrate import CalibrationContext, collect_stats
    from infq.runtime.loader import HFWeights

    windows = _windows(req, opts.config, src, cfg)  # (n, T) token ids
    ctx = CalibrationContext(cfg, HFWeights(ckpt), opts.config, method_fn("kquant"), device=torch.device(req.device),
                             store_dtype=_HALF.get(cfg.torch_dtype), stats=frozenset({"sqmean"}))
    task = bar.add_task("imatrix", total=cfg.num_layers, info="") if bar is not None else None
    means: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    for i, stats in collect_stats(ctx, windows):
        for module, st in stats.items():
            name = gguf_name(f"{module}.weight")
            means[name], tokens[name] = st.sqmean.cpu(), st.tokens
        if task is not None:
            bar.update(task, completed=i + 1, info=f"block {i}")
    dataset = req.dataset or _default_dataset(req)
    return Imatrix.from_means(means, tokens, [dataset], chunk_count=int(windows.shape[0]),
                              chunk_size=int(windows.shape[1]))


def _encode(out: Path, src: Path, meta_config: dict[str, Any], ckpt: Any, names: list[str], plan: Any, im: Any,
            im_info: dict[str, Any], opts: KquantOptions, bar: Any) -> dict[str, Any]:
    """Stream every tensor through its planned type into the GGUF file; timings and warnings."""
    from infq.formats.gguf import gguf_name, write_gguf_stream
    from infq.formats.gguf_vocab import tokenizer_metadata
    from infq.quantizers.kquants import quantize_kquant

    types = plan.types()
    tok, warnings = tokenizer_metadata(src, int(meta_config["vocab_size"]))
    extra: dict[str, Any] = {}
    if im is not None:
        if im_info["source"] != "collected":
            extra["quantize.imatrix.file"] = im_info["source"]
        if im.datasets:
            extra["quantize.imatrix.dataset"] = im.datasets[-1]
        extra["quantize.imatrix.entries_count"] = len(im.sums)
        extra["quantize.imatrix.chunks_count"] = im.chunk_count
    task = bar.add_task("encode", total=len(names), info="") if bar is not None else None
    clock = {"encode": 0.0, "done": 0}
    device = torch.device(opts.device)

    def produce(hf: str) -> Any:
        name, t0 = gguf_name(hf), time.perf_counter()
        weight = ckpt.get(hf).to(torch.float32)  # (out, in) or (d,)
        if device.type != "cpu" and weight.dim() == 2:
            weight = weight.to(device)  # --device cuda: the block fits run on the GPU
        qtype = types[name]
        if qtype in dict(kquant_mix.FLOAT_TYPES):
            value: Any = weight
        else:
            stats = LayerStats(weight.shape[1])
            if im is not None and name in im.sums:
                stats.sqmean = im.mean(name)  # (in,)
            value = quantize_kquant(weight, stats, opts.config, qtype)
        clock["encode"] += time.perf_counter() - t0
        clock["done"] += 1
        if task is not None:
            bar.update(task, completed=clock["done"], info=f"{name} {qtype}")
        return value

    entries = [(hf, tuple(ckpt.shape(hf)), types[gguf_name(hf)]) for hf in names]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf_stream(out, meta_config, entries, produce, tokenizer=tok, file_type=plan.file_type, extra=extra)
    except OSError as exc:
        raise InfqError(f"could not write {out} ({exc}); check the folder, its permissions and free space") from exc
    warnings += [f"{f['tensor']}: {f['from']} -> {f['to']} ({f['why']})" for f in plan.fallbacks]
    return {"encode_seconds": round(clock["encode"], 3), "tensors": len(entries), "warnings": warnings,
            "tokenizer": None if tok is None else tok["model"]}
