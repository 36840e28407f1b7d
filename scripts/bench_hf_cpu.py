"""The peer for benches/towers.rs: HF transformers CLIPModel (fp32, SDPA attention) on the same
checkpoint, thread count, image batch and prompt batch. Prints one JSON object.

    python scripts/bench_hf_cpu.py --model DIR --threads 2 --batch 32 --prompts 256
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import CLIPModel


def median_seconds(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = CLIPModel.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    seq = 16
    ids = torch.tensor(
        [[49406 if j == 0 else 49407 if j == seq - 1 else (1000 + 37 * i + 101 * j) % 49000 for j in range(seq)]
         for i in range(args.prompts)]
    )
    mask = torch.ones_like(ids)

    with torch.inference_mode():
        def image():
            out = model.vision_model(pixel_values=pixels)
            return model.visual_projection(out.pooler_output)

        def text():
            out = model.text_model(input_ids=ids, attention_mask=mask)
            return model.text_projection(out.pooler_output)

        img_s, img_all = median_seconds(image, args.reps)
        txt_s, txt_all = median_seconds(text, args.reps)
    print(json.dumps({
        "peer": f"HF transformers {transformers.__version__} CLIPModel (torch {torch.__version__}, fp32, sdpa)",
        "threads": args.threads,
        "batch": args.batch,
        "prompts": args.prompts,
        "image_img_per_s": args.batch / img_s,
        "text_prompts_per_s": args.prompts / txt_s,
        "image_seconds": img_all,
        "text_seconds": txt_all,
    }))


if __name__ == "__main__":
    main()
