"""Feature-extraction throughput, our Flax encoder vs PyTorch transformers, side by side in one run.

Same checkpoint (all-MiniLM-L6-v2 by default), same IMDB test reviews with the template,
same length-sorted batches padded to the same widths, same CPU. Reports reviews/s for
each (JAX after a warm-up pass that compiles every bucket shape) and the largest feature
difference. Needs torch (`pip install torch==2.13.0`). PyTorch runs on the GPU when it sees one,
as JAX does.

  SENTIMENT_JAX_DATA=/path/to/data python benchmarks/verbalizer_throughput.py --num=512 --max_length=256 [--cpu_devices=2]
"""

import argparse
import json
import pathlib
import time

import jax
import numpy as np
import torch
import transformers

from sentiment_jax import data as data_lib
from sentiment_jax import sharding, verbalizer
from sentiment_jax.config_base import base_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu_devices", type=int, default=0, help=">0: our side on this many single-threaded devices")
    parser.add_argument("--json_out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.cpu_devices:
        sharding.use_cpu_devices(args.cpu_devices)

    cfg = base_config()
    cfg.backbone.path = args.backbone
    cfg.data.max_examples = args.num
    dataset = data_lib.load_dataset(cfg.data)
    texts = dataset.splits["test"].texts[:args.num]
    backbone = verbalizer.load_backbone(cfg.backbone)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, _ = verbalizer.encode_windows(backbone.tokenizer, texts, cfg.backbone.template, args.max_length)
    print(f"{len(rows)} reviews, mean {np.mean([len(r) for r in rows]):.0f} tokens, max_length {args.max_length}, "
          f"batch {args.batch_size}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} on {device.type} with {torch.get_num_threads()} threads")

    extractor = verbalizer.Extractor(backbone, cfg.backbone.layers, sharding.make_mesh(cfg.mesh), cfg.mesh)
    t0 = time.perf_counter()
    extractor(rows, args.batch_size, cfg.backbone.bucket_width)
    compile_pass = time.perf_counter() - t0

    def run_jax():
        return extractor(rows, args.batch_size, cfg.backbone.bucket_width)["mean"]

    model = transformers.AutoModel.from_pretrained(verbalizer.resolve_folder(args.backbone)).eval().to(device)
    order = np.argsort([len(r) for r in rows], kind="stable")

    def run_torch():
        theirs = np.zeros((len(rows), model.config.hidden_size), np.float32)
        with torch.inference_mode():
            for start in range(0, len(rows), args.batch_size):
                chunk = order[start:start + args.batch_size]
                width = -(-max(len(rows[i]) for i in chunk) // cfg.backbone.bucket_width) * cfg.backbone.bucket_width
                ids = np.zeros((len(chunk), width), np.int64)
                for j, i in enumerate(chunk):
                    ids[j, :len(rows[i])] = rows[i]
                mask = torch.tensor(ids != 0, dtype=torch.long, device=device)
                hidden = model(input_ids=torch.tensor(ids, device=device), attention_mask=mask).last_hidden_state
                m = mask[..., None].float()
                theirs[chunk] = ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()  # waits for the GPU
        return theirs

    # Interleaved repeats, so a burst of other load hits both sides alike; medians reported.
    rates, features = {"jax": [], "torch": []}, {}
    for _ in range(args.repeats):
        for name, run in (("jax", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            features[name] = run()
            rates[name].append(len(rows) / (time.perf_counter() - t0))
    print(f"jax   : {np.median(rates['jax']):6.1f} reviews/s median of {[round(r, 1) for r in rates['jax']]} "
          f"(first pass with compilation {compile_pass:.1f} s)")
    print(f"torch : {np.median(rates['torch']):6.1f} reviews/s median of {[round(r, 1) for r in rates['torch']]}")
    print(f"ratio jax/torch of medians: {np.median(rates['jax']) / np.median(rates['torch']):.2f}")
    max_diff = float(np.abs(features['jax'] - features['torch']).max())
    print(f"max |jax - torch| of mean-pooled features: {max_diff:.2e}")
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps({
            "reviews": len(rows), "max_length": args.max_length, "batch_size": args.batch_size,
            "jax_platform": jax.devices()[0].platform, "torch_device": device.type,
            "jax_reviews_per_s": float(np.median(rates["jax"])), "torch_reviews_per_s": float(np.median(rates["torch"])),
            "jax_rates": rates["jax"], "torch_rates": rates["torch"], "compile_pass_s": compile_pass,
            "max_feature_difference": max_diff}, indent=2))


if __name__ == "__main__":
    main()
