#!/usr/bin/env bash
# The GPU machine's whole job in one call: the GPU tests, then the side-by-side benchmark.
#   device run, carry [".device-site"]:   bash benches/gpu/run.sh
# Logs and JSON land in $OUT; the short tables come last.
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fastq-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate, bitsandbytes, fastq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__, 'fastq', fastq.__version__)" | tee -a "$OUT/gpu.txt"
# The CUDA reference of tests/test_quantize_bnb.py written again on this GPU (it comes back under $OUT, to
# be committed as tests/fixtures/bnb_cuda_nested.safetensors) and the fixture tests run against it here.
# FIXTURE=0 skips both (the fixture in the tree is an H200's since run 13).
fixture_tests=()
if [[ ${FIXTURE:-1} != 0 ]]; then
  python3 benches/gpu/make_nested_fixture.py "$OUT" && cp "$OUT/bnb_cuda_nested.safetensors" tests/fixtures/
  fixture_tests=("tests/test_quantize_bnb.py::test_double_quant_offset_sums_as_the_gpu"
    "tests/test_quantize_bnb.py::test_double_quant_of_the_fixture_weights_is_the_gpus"
    "tests/test_quantize_bnb.py::test_nested_matches_cuda_fixture"
    "tests/test_quantize_bnb.py::test_weights_against_cuda_fixture")
fi
timeout "${GPU_TEST_TIMEOUT:-200}" python3 -m pytest tests/test_gpu.py tests/test_gpu_moe.py tests/test_transfer.py \
  ${fixture_tests[@]+"${fixture_tests[@]}"} -q -p no:cacheprovider -x \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -20
timeout "${GPU_BENCH_TIMEOUT:-380}" python3 benches/gpu/compare.py --work /tmp/fastq-gpu --out "$OUT" "$@" \
  2>&1 | tee "$OUT/compare.log" | grep -v '^{'
# VARIANTS="FASTQ_COPY_STREAM=0;FASTQ_RING_SLOTS=6": the fq_* cases again under each ;-separated set of
# environment assignments, load figures only (COMPARE_LOAD_ONLY), in the same call as the cases above;
# VARIANT_CASES="fq_pre fq_plain" runs only those under each variant
mkdir -p "$OUT/variant"
IFS=';' read -ra variants <<< "${VARIANTS:-}"
fq_cases=(); for c in "$@"; do [[ $c == fq_* && $c != fq_convert* ]] && fq_cases+=("$c"); done
# shellcheck disable=SC2206 # a list of case names
[[ -n ${VARIANT_CASES:-} ]] && fq_cases=(${VARIANT_CASES})
for v in "${variants[@]}"; do
  [[ -z $v || ${#fq_cases[@]} -eq 0 ]] && continue
  echo "## variant: $v" | tee -a "$OUT/variants.log"
  # shellcheck disable=SC2086 # the variant is a list of assignments
  env $v COMPARE_LOAD_ONLY=1 timeout "${GPU_VARIANT_TIMEOUT:-200}" python3 benches/gpu/compare.py \
    --work /tmp/fastq-gpu --out "$OUT/variant" --cases "${fq_cases[@]}" 2>&1 | grep -v '^{' | tee -a "$OUT/variants.log"
done
rm -rf "$OUT/variant"
# NESTED_DIFF=1: where quantize_on="cpu" differs from transformers on this GPU, code by code (nested_diff.py);
# PROFILE_RELOAD=1: the pre-quantized reload's phases and profile (profile_load.py --reload; after fq_convert)
if [[ ${NESTED_DIFF:-0} != 0 ]]; then
  timeout "${GPU_EXTRA_TIMEOUT:-90}" python3 benches/gpu/nested_diff.py --work /tmp/fastq-gpu --out "$OUT" \
    2>&1 | tee "$OUT/nested_diff.log" | tail -8
fi
if [[ ${PROFILE_RELOAD:-0} != 0 ]]; then
  timeout "${GPU_EXTRA_TIMEOUT:-90}" python3 benches/gpu/profile_load.py --reload /tmp/fastq-gpu/llama7b-nf4 \
    2>&1 | tee "$OUT/profile_reload.log" | head -12
fi
# at most 8 files come back from a device call: the per-case logits and digests stay there
rm -f "$OUT"/logits_*.pt "$OUT"/digests_*.json
