"""GPTQ on the demo model: infq vs GPTQModel, same calibration windows, same settings.

Usage: python bench/peer_gptqmodel.py --peer-python /path/to/peer-venv/bin/python [--bits 4 3]

GPTQModel lives in its own virtual environment (see ../shared/reference/peers.md: install it with a
constraint `torch==2.13.0+cpu`; it imports torchvision, stubbed here). This script draws the
calibration windows once with infq (demo corpus, seeded), hands the same token ids to both tools,
times each quantization in its own process, then scores both checkpoints with `infq eval` (which
also shows that infq reads GPTQModel's output). Writes bench/results/peer_gptqmodel.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import infq, write

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
qc = QuantizeConfig(bits=cfg["bits"], group_size=cfg["group_size"], sym=True, desc_act=False,
                    damp_percent=cfg["damp"])
start = time.perf_counter()
model = GPTQModel.load(cfg["model"], qc, device="cpu")
model.quantize(data, batch_size=1)
model.save(cfg["out"])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", required=True)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--damp", type=float, default=0.01)
    args = p.parse_args()

    from infq.eval.datasets import calibration_windows
    from infq.formats.hf import demo_model_path, load_tokenizer

    model = demo_model_path()
    work = Path(tempfile.mkdtemp(prefix="infq-peer-"))
    windows = calibration_windows(load_tokenizer(model), "demo", args.nsamples, args.seqlen, seed=0)
    (work / "windows.json").write_text(json.dumps(windows.tolist()))
    fp = infq("eval", "demo", "--ppl", "demo", "--seqlen", args.seqlen)
    from infq.eval.datasets import eval_tokens

    cross_windows = 20  # GPTQModel's CPU kernels are slow: score a prefix for the cross-load check
    tokens = eval_tokens(load_tokenizer(model), "demo")[: cross_windows * args.seqlen]
    (work / "tokens.json").write_text(json.dumps(tokens.tolist()))
    rows = []
    for bits in args.bits:
        cfg = {"model": str(model), "bits": bits, "group_size": args.group_size, "damp": args.damp,
               "windows": str(work / "windows.json"), "out": str(work / f"gptqmodel-w{bits}")}
        t0 = time.perf_counter()
        out = subprocess.run([args.peer_python, "-c", PEER, json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        peer_s = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        peer_wall = time.perf_counter() - t0
        peer_eval = infq("eval", cfg["out"], "--ppl", "demo", "--seqlen", args.seqlen)
        ours = infq("quantize", "--method", "gptq", "--bits", bits, "--group-size", args.group_size,
                    "--damp", args.damp, "--dataset", "demo", "--nsamples", args.nsamples,
                    "--seqlen", args.seqlen, "--out", work / f"infq-w{bits}", "--force")
        ours_eval = infq("eval", work / f"infq-w{bits}", "--ppl", "demo", "--seqlen", args.seqlen)
        cross = {"load": str(work / f"infq-w{bits}"), "tokens": str(work / "tokens.json"), "seqlen": args.seqlen}
        out = subprocess.run([args.peer_python, "-c", PEER, json.dumps(cross)], capture_output=True, text=True)
        peer_on_ours = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
        ours_prefix = infq("eval", work / f"infq-w{bits}", "--ppl", "demo", "--seqlen", args.seqlen,
                           "--limit", cross_windows)
        row = {"bits": bits, "group_size": args.group_size,
               "cross_load": {"windows": cross_windows, "infq_ppl": ours_prefix["ppl"],
                              "gptqmodel_loading_infq_checkpoint_ppl": peer_on_ours.get("ppl"),
                              "error": peer_on_ours.get("error")},
               "gptqmodel": {"ppl": peer_eval["ppl"], "quantize_s": peer_s, "process_wall_s": peer_wall},
               "infq": {"ppl": ours_eval["ppl"], "quantize_s": ours["seconds"], "process_wall_s": ours["wall_s"]}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = write("peer_gptqmodel.json", {
        "fp_ppl": fp["ppl"], "eval": {"dataset": "demo", "protocol": "gptq", "seqlen": args.seqlen, "windows": fp["windows"]},
        "calibration": {"dataset": "demo", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "peer": "GPTQModel 7.3.6", "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
