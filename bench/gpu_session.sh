#!/usr/bin/env bash
# What a session with a lent GPU (the `device` tool's H100/H200 machine) runs, one part per call,
# each well inside a call's 10 minutes, from the repository root on that machine:
#
#   bash bench/gpu_session.sh tests     # the GPU test modules, compiled (CUDA graphs, fused ops, kernels)
#   bash bench/gpu_session.sh decode    # bench/gpu_decode.py: batch-1 decode vs the copy-bandwidth roofline,
#                                       # eager and with --cuda-graphs (TinyLlama-1.1B shape, bf16 and int4)
#   bash bench/gpu_session.sh decode7b  # the same at Llama-2-7B's shape (bf16 and int4)
#   bash bench/gpu_session.sh serving   # infq bench on CUDA: continuous vs static (eager)
#   bash bench/gpu_session.sh serving-graphs  # the same with --cuda-graphs
#   bash bench/gpu_session.sh gemm      # bench/gpu_dequant_gemm.py
#   bash bench/gpu_session.sh attention # bench/gpu_attention.py
#
# The machine's own python3 holds torch, triton, transformers, typer, rich and safetensors; infq
# runs from the checkout (PYTHONPATH), nothing is installed. Results land in bench/results/ and are
# copied to $OUT (the files that come back); commit them with the device name they record.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
case "${1:-}" in
  tests)
    python3 -m pytest -q -x tests/kernels/test_kernels_gpu.py tests/kernels/test_attention_gpu.py \
      tests/runtime/test_engine_gpu.py 2>&1 | tee "$out/gpu_tests.log" ;;
  decode)
    python3 bench/gpu_decode.py --shape tinyllama --variants bf16,int4-g128 --tokens 128 --out gpu_decode.json
    cp bench/results/gpu_decode.json "$out/" ;;
  decode7b)
    python3 bench/gpu_decode.py --shape llama7b --variants bf16,int4-g128 --tokens 64 --out gpu_decode_llama7b.json
    cp bench/results/gpu_decode_llama7b.json "$out/" ;;
  serving)
    (cd bench && python3 runtime_bench.py --only cuda_bf16)
    cp bench/results/runtime_cuda_bf16.json "$out/" ;;
  serving-graphs)
    (cd bench && python3 runtime_bench.py --only cuda_bf16_graphs)
    cp bench/results/runtime_cuda_bf16_graphs.json "$out/" ;;
  gemm)
    python3 bench/gpu_dequant_gemm.py
    cp bench/results/gpu_dequant_gemm.json "$out/" ;;
  attention)
    python3 bench/gpu_attention.py
    cp bench/results/gpu_attention.json "$out/" ;;
  *)
    echo "usage: bash bench/gpu_session.sh tests|decode|decode7b|serving|serving-graphs|gemm|attention" >&2
    exit 2 ;;
esac
