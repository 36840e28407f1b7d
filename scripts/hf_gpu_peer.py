"""The PyTorch peer of the device check: HF transformers CLIPModel on the GPU, on the same
checkpoint and batch as setar-engine's device_check, plus the bf16 GEMM rate torch.matmul gets
on this GPU (the ceiling the issue's "≥ 50% of the measured bf16 GEMM rate" refers to).
Prints one JSON object.

    python3 scripts/hf_gpu_peer.py --model /tmp/setar-vitb16 --batch 256 [--reps 20] [--dtypes bf16,f32]

Image tower = vision_model + visual_projection (global features), SDPA attention, inputs
already on the GPU, timed with CUDA events after warm-up (median of --reps).
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import CLIPModel

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def time_cuda(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), times


def load(path, dtype):
    try:
        model = CLIPModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = CLIPModel.from_pretrained(path, attn_implementation="sdpa", torch_dtype=dtype)
    return model.cuda().eval()


def gemm_rate(n, reps, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
    sec, _ = time_cuda(lambda: torch.matmul(a, b), reps)
    return 2 * n**3 / sec / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtypes", default="bf16,f32")
    args = ap.parse_args()
    t0 = time.time()
    out = {
        "peer": f"HF transformers {transformers.__version__} CLIPModel (torch {torch.__version__}, sdpa)",
        "device": torch.cuda.get_device_name(0),
        "batch": args.batch,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "image_tower": {},
    }
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        model = load(args.model, dtype)
        size = model.config.vision_config.image_size
        g = torch.Generator(device="cuda").manual_seed(1)
        pixels = torch.randn(args.batch, 3, size, size, device="cuda", dtype=dtype, generator=g)

        @torch.inference_mode()
        def image():
            o = model.vision_model(pixel_values=pixels)
            return model.visual_projection(o.pooler_output)

        sec, all_s = time_cuda(image, args.reps)
        out["image_tower"][name] = {"img_per_s": args.batch / sec, "seconds": all_s}
        del model, pixels
        torch.cuda.empty_cache()
    out["gemm_bf16_8192_tflops"] = gemm_rate(8192, 10)
    out["seconds"] = time.time() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
