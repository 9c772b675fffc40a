"""The prepared GPU check: one script, a few minutes on one GPU, printing one line per check and a JSON record.

    python scripts/gpu_check.py --out outputs/gpu_check.json            # on a machine with a CUDA GPU
    python scripts/gpu_check.py --device cpu --quick                     # the same checks on the CPU (a dry run)

Checks, on the shipped model (assets/shapes_small) unless said otherwise:
- bf16: text -> image and captions in bfloat16 against float32 (finite; how far apart);
- SDPA kernels: which scaled-dot-product kernels run the model's attention shapes (flash, memory-efficient, math);
- torch.compile: the transformer compiled in place, the same images as eager (max difference);
- offload: `enable_model_cpu_offload`, `enable_sequential_cpu_offload`, the transformer's `enable_group_offload`
  (block and leaf level) and `enable_layerwise_casting` (float8 storage), each against the plain pipeline, for both
  pipelines (images: max difference; captions: equal or not);
- the bench: `mmdiff bench --preset gpu-b2` (training and sampling throughput, MFU against the measured bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmdiff.pipelines import MMDiffTextToImagePipeline, as_image_to_text
from mmdiff.pipelines.factory import load_pipeline

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "shapes_small"
PROMPTS = ["a small red circle above a large blue square", "there is a large green triangle"]


def _images(pipe, steps: int) -> torch.Tensor:
    out = pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images.float().cpu()


def _captions(pipe, images) -> list[str]:
    i2t = as_image_to_text(pipe)
    return i2t(list(images), generator=torch.Generator().manual_seed(0)).text


def _fresh(device: str, dtype: str = "float32", to_device: bool = True) -> MMDiffTextToImagePipeline:
    pipe = load_pipeline(str(SHIPPED), device="cpu", dtype=dtype, progress=False)
    return pipe.to(device) if to_device else pipe


def check_bf16(device: str, steps: int) -> dict:
    ref = _images(_fresh(device), steps)
    half = _images(_fresh(device, "bfloat16"), steps)
    return {"finite": bool(torch.isfinite(half).all()), "max_abs_diff_vs_fp32": float((half - ref).abs().max())}


def check_sdpa(device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(16, 6, 16, 32, device=device, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    works = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            works[backend.name] = True
        except RuntimeError:
            works[backend.name] = False
    return works


def check_compile(device: str, steps: int) -> dict:
    eager = _images(_fresh(device), steps)
    pipe = _fresh(device)
    pipe.transformer.compile()
    start = time.perf_counter()
    compiled = _images(pipe, steps)
    return {"max_abs_diff_vs_eager": float((compiled - eager).abs().max()), "first_call_s": time.perf_counter() - start}


def check_offload(device: str, steps: int) -> dict:
    reference_pipe = _fresh(device)
    reference = _images(reference_pipe, steps)
    captions = _captions(reference_pipe, reference * 2 - 1)
    results = {}

    def model_offload(pipe):
        pipe.enable_model_cpu_offload(device=device)

    def sequential(pipe):
        pipe.enable_sequential_cpu_offload(device=device)

    def group(level):
        def apply(pipe):
            target = torch.device(device)
            kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
            pipe.transformer.enable_group_offload(target, offload_type=level, **kwargs)
            pipe.vae.to(target)

        return apply

    def layerwise(pipe):
        pipe.to(device, torch.bfloat16)
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)

    setups = {
        "model_cpu_offload": model_offload,
        "sequential_cpu_offload": sequential,
        "group_offload_block": group("block_level"),
        "group_offload_leaf": group("leaf_level"),
        "layerwise_casting_fp8": layerwise,
    }
    for name, setup in setups.items():
        try:
            pipe = _fresh(device, to_device=False)
            setup(pipe)
            images = _images(pipe, steps)
            results[name] = {
                "max_abs_diff": float((images - reference).abs().max()),
                "captions_equal": _captions(pipe, images * 2 - 1) == captions,
            }
        except Exception as err:  # a check that fails is a result to record, not the end of the script
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    return results


def check_bench(device: str, quick: bool, out: Path) -> dict:
    cli = "from mmdiff.cli import main; raise SystemExit(main())"
    command = [sys.executable, "-c", cli, "bench", "--out", str(out / "bench.json"), "--device", device]
    command += ["--quick"] if quick else ["--preset", "gpu-b2"]
    done = subprocess.run(command, capture_output=True, text=True)
    report = json.loads((out / "bench.json").read_text()) if done.returncode == 0 else None
    return {"returncode": done.returncode, "tail": done.stdout[-2000:] + done.stderr[-2000:], "report": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--quick", action="store_true", help="fewer steps and `mmdiff bench --quick`")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 4 if args.quick else 25
    record = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    record["torch"] = torch.__version__
    for name, check in (
        ("bf16", lambda: check_bf16(args.device, steps)),
        ("sdpa_kernels", lambda: check_sdpa(args.device)),
        ("compile", lambda: check_compile(args.device, steps)),
        ("offload", lambda: check_offload(args.device, steps)),
        ("bench", lambda: check_bench(args.device, args.quick, out)),
    ):
        start = time.perf_counter()
        try:
            record[name] = check()
        except Exception as err:
            record[name] = {"error": f"{type(err).__name__}: {err}"}
        shown = {k: v for k, v in record[name].items() if k not in ("tail", "report")}
        print(f"{name} ({time.perf_counter() - start:.1f} s): {json.dumps(shown, default=str)}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"record: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
