"""GPTQ on the demo model: infq vs GPTQModel, same calibration windows, same settings.

Usage: python bench/peer_gptqmodel.py --peer-python /path/to/peer-venv/bin/python
           [--bits 4 3] [--seeds 0 1 2] [--act-group-aware auto|on|off] [--peer-dtype auto|float32]
           [--no-infq] [--shared-machine] [--out peer_gptqmodel.json]

GPTQModel lives in its own virtual environment (see ../shared/reference/peers.md: install it with a
constraint `torch==2.13.0+cpu`; it imports torchvision, stubbed here; 7.3.6 also imports
`requests` without declaring it). Setup used (outside the repo):
    echo 'torch==2.13.0+cpu' > c.txt && python3 -m venv /work/peers/gptqmodel
    /work/peers/gptqmodel/bin/pip install -c c.txt torch==2.13.0+cpu gptqmodel==7.3.6 requests

For each calibration seed this script draws the calibration windows once with infq (demo corpus,
128 x 512 tokens), hands the same token ids to both tools (`infq quantize --seed S` draws the
identical windows), times each quantization in its own process, then scores both checkpoints with
`infq eval` (which also shows that infq reads GPTQModel's output): GPTQ protocol, 607 windows of
512 tokens. With several seeds it reports per-seed perplexities and, per bit width, the mean (and
spread) for each tool and the mean paired difference infq - GPTQModel. On the first seed only,
GPTQModel's own loader and kernels also score infq's checkpoint on the first 20 evaluation windows
(a cross-load check).

GPTQModel 7.3.6 defaults that differ from infq at these settings (sym, desc_act False, g128):
`act_group_aware` (GAR: columns reordered within each group by diag(H), groups ordered by their
max diag(H)) is on by default for GPTQ, and on CPU the model is loaded, calibrated and saved in
bfloat16 (`auto_dtype`; embeddings, norms and lm_head are written as bf16). `--act-group-aware off
--peer-dtype float32` takes both away, leaving the algorithms comparable column for column.
Writes bench/results/peer_gptqmodel.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import RESULTS, infq, write

PEER = r"""
import json, sys, time, types, os
# GPTQModel imports torchvision (for vision models) and the registry's build does not match the
# CPU torch: serve any torchvision import with inert stand-ins, after transformers has recorded
# that torchvision is absent.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import importlib.machinery
import transformers.utils.import_utils as iu
iu.is_torchvision_available()  # cache the truth (False) before the stub appears
class _Any(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        m = _Any(f"{self.__name__}.{name}")
        m.__path__ = []
        sys.modules[m.__name__] = m
        setattr(self, name, m)
        return m
    def __call__(self, *a, **k):
        return self
class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            import importlib.machinery
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Any(spec.name); m.__path__ = []; return m
    def exec_module(self, module):
        pass
sys.meta_path.append(_Finder())
import torch
from gptqmodel import GPTQModel, QuantizeConfig
cfg = json.loads(sys.argv[1])
if cfg.get("load"):  # score a checkpoint (e.g. infq's) with GPTQModel's own loader and kernels
    model = GPTQModel.load(cfg["load"], device="cpu")
    tokens = torch.tensor(json.load(open(cfg["tokens"])))
    S, nll = cfg["seqlen"], 0.0
    n = tokens.numel() // S
    with torch.no_grad():
        for i in range(n):
            ids = tokens[i * S:(i + 1) * S][None]
            logits = model.model(ids).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])) * S
    print(json.dumps({"ppl": float(torch.exp(torch.tensor(nll / (n * S)))), "windows": n}))
    sys.exit(0)
windows = json.load(open(cfg["windows"]))
data = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)} for w in windows]
extra = {} if cfg.get("act_group_aware") is None else {"act_group_aware": cfg["act_group_aware"]}
qc = QuantizeConfig(bits=cfg["bits"], group_size=cfg["group_size"], sym=True, desc_act=False,
                    damp_percent=cfg["damp"], **extra)
start = time.perf_counter()
kw = {} if cfg.get("dtype", "auto") == "auto" else {"dtype": getattr(torch, cfg["dtype"])}
model = GPTQModel.load(cfg["model"], qc, device="cpu", **kw)
calib_dtype = str(model.model.dtype)
model.quantize(data, batch_size=1)
model.save(cfg["out"])
seconds = time.perf_counter() - start
import resource, glob
from safetensors import safe_open
saved = {}
for f in glob.glob(os.path.join(cfg["out"], "*.safetensors")):
    with safe_open(f, "pt") as st:
        for k in st.keys():
            saved.setdefault(str(st.get_slice(k).get_dtype()), []).append(k)
print(json.dumps({"seconds": seconds, "calib_dtype": calib_dtype,
                  "act_group_aware": getattr(qc, "act_group_aware", None),
                  "damp_auto_increment": getattr(qc, "damp_auto_increment", None),
                  "saved_dtypes": {k: len(v) for k, v in saved.items()},
                  "saved_examples": {k: v[:3] for k, v in saved.items()},
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def infq_source() -> dict[str, object]:
    """The infq commit the figures came from, and uncommitted files under infq/ (if any)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "infq").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted": dirty}


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", required=True, help="python of the GPTQModel venv")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="calibration sampling seeds; windows drawn per seed, same to both tools")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--act-group-aware", choices=["auto", "on", "off"], default="auto",
                   help="GPTQModel's GAR reordering (auto: its default, on for GPTQ without desc_act)")
    p.add_argument("--peer-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="dtype GPTQModel loads the model in (auto: its default, bfloat16 on CPU)")
    p.add_argument("--no-infq", action="store_true", help="run GPTQModel only (diagnostic variants)")
    p.add_argument("--cross-windows", type=int, default=20,
                   help="windows for the first seed's cross-load check (0: skip)")
    p.add_argument("--shared-machine", action="store_true",
                   help="note in the JSON that other jobs loaded the CPU during the timings")
    p.add_argument("--out", default="peer_gptqmodel.json", help="file name under bench/results")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished (seed, bits) rows of an earlier run with the same settings"
                        " (the JSON is rewritten after every row)")
    args = p.parse_args()

    import os

    from infq.eval.datasets import calibration_windows, eval_tokens
    from infq.formats.hf import demo_model_path, load_tokenizer

    model = demo_model_path()
    tok = load_tokenizer(model)
    work = Path(tempfile.mkdtemp(prefix="infq-peer-"))
    calibration = {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen}
    peer_settings = {"sym": True, "desc_act": False, "group_size": args.group_size, "damp_percent": args.damp,
                     "act_group_aware": args.act_group_aware, "dtype": args.peer_dtype}
    done: dict[tuple[int, int], dict] = {}
    previous = json.loads((RESULTS / args.out).read_text()) if (RESULTS / args.out).exists() else None
    if (args.resume and previous and previous.get("peer_settings") == peer_settings
            and {k: v for k, v in previous.get("calibration", {}).items() if k != "seeds"} == calibration
            and previous.get("with_infq") == (not args.no_infq)):
        fp = {"ppl": previous["fp_ppl"], "windows": previous["eval"]["windows"]}
        done = {(r["seed"], r["bits"]): r for r in previous["rows"]}
        print(f"resuming: {len(done)} finished rows kept from {RESULTS / args.out}", flush=True)
    else:
        fp = infq("eval", "demo", "--ppl", "demo", "--seqlen", args.seqlen)
    cross_windows = args.cross_windows  # GPTQModel's CPU kernels are slow: score a prefix only
    tokens = eval_tokens(tok, "demo")[: cross_windows * args.seqlen]
    (work / "tokens.json").write_text(json.dumps(tokens.tolist()))
    gar = {"auto": None, "on": True, "off": False}[args.act_group_aware]
    rows = []
    for si, seed in enumerate(args.seeds):
        windows = calibration_windows(tok, "demo", args.nsamples, args.seqlen, seed=seed)
        wfile = work / f"windows-{seed}.json"
        wfile.write_text(json.dumps(windows.tolist()))
        for bits in args.bits:
            if (seed, bits) in done:
                rows.append(done[(seed, bits)])
                continue
            cfg = {"model": str(model), "bits": bits, "group_size": args.group_size, "damp": args.damp,
                   "windows": str(wfile), "out": str(work / f"gptqmodel-s{seed}-w{bits}"),
                   "act_group_aware": gar, "dtype": args.peer_dtype}
            t0 = time.perf_counter()
            out = subprocess.run([args.peer_python, "-c", PEER, json.dumps(cfg)], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            peer = json.loads(out.stdout.strip().splitlines()[-1])
            peer_wall = time.perf_counter() - t0
            peer_eval = infq("eval", cfg["out"], "--ppl", "demo", "--seqlen", args.seqlen)
            row = {"seed": seed, "bits": bits, "group_size": args.group_size, "infq_source": infq_source(),
                   "gptqmodel": {"ppl": peer_eval["ppl"], "quantize_s": peer["seconds"],
                                 "process_wall_s": peer_wall, "peak_rss_bytes": peer["peak_rss_bytes"],
                                 "calib_dtype": peer["calib_dtype"], "act_group_aware": peer["act_group_aware"],
                                 "saved_dtypes": peer["saved_dtypes"], "loadavg_after": os.getloadavg()}}
            if not args.no_infq:
                ours_dir = work / f"infq-s{seed}-w{bits}"
                ours = infq("quantize", "--method", "gptq", "--bits", bits, "--group-size", args.group_size,
                            "--damp", args.damp, "--dataset", "demo", "--nsamples", args.nsamples,
                            "--seqlen", args.seqlen, "--seed", seed, "--out", ours_dir, "--force")
                ours_eval = infq("eval", ours_dir, "--ppl", "demo", "--seqlen", args.seqlen)
                row["infq"] = {"ppl": ours_eval["ppl"], "quantize_s": ours["seconds"],
                               "process_wall_s": ours["wall_s"], "peak_rss_bytes": ours["peak_rss_bytes"],
                               "loadavg_after": os.getloadavg()}
                if si == 0 and cross_windows:
                    cross = {"load": str(ours_dir), "tokens": str(work / "tokens.json"), "seqlen": args.seqlen}
                    out = subprocess.run([args.peer_python, "-c", PEER, json.dumps(cross)],
                                         capture_output=True, text=True)
                    peer_on_ours = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                    else {"error": out.stderr[-500:]})
                    ours_prefix = infq("eval", ours_dir, "--ppl", "demo", "--seqlen", args.seqlen,
                                       "--limit", cross_windows)
                    row["cross_load"] = {"windows": cross_windows, "infq_ppl": ours_prefix["ppl"],
                                         "gptqmodel_loading_infq_checkpoint_ppl": peer_on_ours.get("ppl"),
                                         "error": peer_on_ours.get("error")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, rows, fp, calibration, peer_settings, complete=False)  # see --resume

    path = save(args, rows, fp, calibration, peer_settings, complete=True)
    for entry in json.loads(path.read_text())["summary"]:
        print(json.dumps(entry), flush=True)
    print(f"wrote {path}")


def save(args: argparse.Namespace, rows: list[dict], fp: dict, calibration: dict, peer_settings: dict,
         complete: bool) -> Path:
    """Write the results so far, with per-bit-width means over the seeds finished."""
    summary = []
    for bits in args.bits:
        mine = [r for r in rows if r["bits"] == bits]
        if not mine:
            continue
        entry = {"bits": bits, "seeds": [r["seed"] for r in mine],
                 "gptqmodel_ppl": _stats([r["gptqmodel"]["ppl"] for r in mine])}
        if not args.no_infq:
            entry["infq_ppl"] = _stats([r["infq"]["ppl"] for r in mine])
            entry["infq_minus_gptqmodel"] = _stats([r["infq"]["ppl"] - r["gptqmodel"]["ppl"] for r in mine])
        summary.append(entry)
    return write(args.out, {
        "complete": complete,
        "infq_source": infq_source(),
        "fp_ppl": fp["ppl"], "eval": {"dataset": "demo", "protocol": "gptq", "seqlen": args.seqlen, "windows": fp["windows"]},
        "calibration": {**calibration, "seeds": sorted({r["seed"] for r in rows})},
        "peer": "GPTQModel 7.3.6",
        "peer_settings": peer_settings,
        "with_infq": not args.no_infq,
        "timing_note": ("taken on a shared 2-core machine (other jobs running): times are inflated"
                        " and noisy" if args.shared_machine else "machine not known to be shared"),
        "summary": summary, "rows": rows,
    })


if __name__ == "__main__":
    main()
