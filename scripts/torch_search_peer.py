"""The PyTorch peer of the device check's search timing: the same SeTAR search (visual_text,
mlp.fc1, the reference's 9 ratios, LoCoOp loss) done the reference's way, with HF
transformers' CLIPModel on the GPU: every candidate re-applies all settings to the original
weights and re-runs both towers on every validation image. Same checkpoint, same inputs
(device_check writes them: --data DIR with pixels.f32 and search.json), same dtype.

Generous to the peer: each target's SVD is computed once and cached (the reference
recomputes it whenever it applies a setting); the pixels already sit on the GPU.
--max-seconds caps the run; the measured seconds per candidate times the number of
candidates then estimates the whole search, and the output says so ("complete": false).

    python3 scripts/torch_search_peer.py --model /tmp/setar-vitb16 --data /tmp/setar-search \
        [--dtype bf16] [--chunk 250] [--max-seconds 100]

Prints one JSON object.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import CLIPModel

DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def load(path, dtype):
    try:
        model = CLIPModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = CLIPModel.from_pretrained(path, attn_implementation="sdpa", torch_dtype=dtype)
    return model.to(DEVICE).eval()


@torch.inference_mode()
def text_features(model, ids, mask):
    out = model.text_model(input_ids=ids, attention_mask=mask)
    return F.normalize(model.text_projection(out.pooler_output).float(), dim=-1)


@torch.inference_mode()
def image_features(model, pixels, chunk):
    """Global features and GL-MCM's local ones (the last block's value path on the patches,
    as the reference computes them), L2-normalised, in f32."""
    vm = model.vision_model
    last = vm.encoder.layers[-1]
    g_all, l_all = [], []
    for s in range(0, pixels.shape[0], chunk):
        o = vm(pixel_values=pixels[s : s + chunk], output_hidden_states=True)
        g_all.append(model.visual_projection(o.pooler_output))
        h = o.hidden_states[-2]
        y = h + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(h)))
        y = y + last.mlp(last.layer_norm2(y))
        l_all.append(model.visual_projection(vm.post_layernorm(y[:, 1:])))
    g = F.normalize(torch.cat(g_all).float(), dim=-1)
    l = F.normalize(torch.cat(l_all).float(), dim=-1)
    return g, l


@torch.inference_mode()
def locoop_loss(g, l, t, labels, scale, lam, top_k, batch):
    """The reference's LoCoOp loss, averaged per batch of `batch` consecutive images."""
    total, n = 0.0, g.shape[0]
    for s in range(0, n, batch):
        gl = scale * g[s : s + batch] @ t.T
        ll = scale * l[s : s + batch] @ t.T
        y = labels[s : s + batch]
        loss_id = F.cross_entropy(gl, y).item()
        top = ll.topk(top_k, dim=-1).indices
        ood = (top != y[:, None, None]).all(dim=-1)
        rows = ll[ood]
        if rows.shape[0] == 0:
            loss_ood = 0.0
        else:
            p = rows.softmax(dim=-1)
            loss_ood = -(-(p * torch.log(p + 1e-5)).sum(dim=-1)).mean().item()
        total += gl.shape[0] * (loss_id + lam * loss_ood)
    return total / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--max-seconds", type=float, default=100.0)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to try the script")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    dtype = DTYPES[args.dtype]
    meta = json.load(open(os.path.join(args.data, "search.json")))
    n, size = meta["images"], meta["image_size"]
    model = load(args.model, dtype)
    pixels = np.fromfile(os.path.join(args.data, "pixels.f32"), dtype=np.float32)
    pixels = torch.from_numpy(pixels.reshape(n, 3, size, size)).to(DEVICE, dtype)
    ids = torch.tensor(meta["input_ids"], device=DEVICE)
    lengths = torch.tensor(meta["lengths"], device=DEVICE)
    mask = (torch.arange(ids.shape[1], device=DEVICE)[None, :] < lengths[:, None]).long()
    labels = torch.tensor(meta["labels"], device=DEVICE)
    scale = model.logit_scale.exp().float().item()
    steps = meta["steps"]
    modules = {s["module"]: model.get_submodule(s["module"]) for s in steps}
    original = {k: m.weight.detach().clone() for k, m in modules.items()}
    sync()

    start = time.time()
    svd = {}
    for k, w in original.items():
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        svd[k] = (u, s, vh)
    sync()
    svd_s = time.time() - start

    def apply(settings):
        """Every setting from the original weights: W − the `rank` smallest components."""
        with torch.no_grad():
            for k, m in modules.items():
                r = settings.get(k, 0)
                if r == 0:
                    m.weight.copy_(original[k])
                else:
                    u, s, vh = svd[k]
                    kk = s.shape[0]
                    removed = (u[:, kk - r :] * s[kk - r :]) @ vh[kk - r :, :]
                    m.weight.copy_((original[k].float() - removed).to(dtype))

    def evaluate(settings):
        apply(settings)
        t = text_features(model, ids, mask)
        g, l = image_features(model, pixels, args.chunk)
        return locoop_loss(
            g, l, t, labels, scale, meta["lambda"], meta["top_k"], meta["loss_batch"]
        )

    evaluate({})  # warm-up (not timed)
    sync()
    total = len(steps) * len(meta["ratios"])
    decided, best = {}, None
    chosen, values, done = [], [], 0
    t0 = time.time()
    stopped = False
    for step in steps:
        k = step["module"]
        step_values, pick = [], (0.0, 0)
        for ratio, rank in zip(meta["ratios"], step["ranks"]):
            v = evaluate({**decided, k: rank})
            done += 1
            step_values.append(v)
            if best is None or v < best:
                best, pick = v, (ratio, rank)
            if time.time() - t0 > args.max_seconds:
                stopped = True
                break
        if stopped:
            break
        decided[k] = pick[1]
        chosen.append(pick[0])
        values.append(step_values)
    sync()
    measured = time.time() - t0
    per = measured / max(done, 1)
    print(
        json.dumps(
            {
                "peer": f"HF transformers {transformers.__version__} CLIPModel "
                f"(torch {torch.__version__}, sdpa), settings re-applied per candidate",
                "dtype": args.dtype,
                "images": n,
                "classes": len(meta["input_ids"]),
                "svd_seconds": svd_s,
                "candidates_total": total,
                "candidates_done": done,
                "complete": not stopped,
                "seconds_measured": measured,
                "seconds_per_candidate": per,
                "seconds_full_search": (measured if not stopped else per * total) + svd_s,
                "chosen_ratios": chosen,
                "step_values": values,
                "best": best,
            }
        )
    )


if __name__ == "__main__":
    main()
