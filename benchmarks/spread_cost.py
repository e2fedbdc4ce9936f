"""What recording the ensemble spread adds to each prediction, against the forward pass.

The spread needs each prediction's voxel count per label (``CropSegmentation.prediction_counts``).
With ``fusion="vote"`` the argmax of every prediction is already taken for the vote, so the added
work per prediction is one ``np.bincount`` of that argmax (and storing ``n_labels`` integers);
nothing else in the ensemble changes. This times, on a crop of ``bagging_accurate``'s size
(sub-04's 40x53x53 box, padded to 40x56x56 for the network):

* ``FusionAccumulator.add`` (argmax, vote, probability sum, and now the count), one prediction;
* the added ``bincount`` alone, on that prediction's argmax;
* one forward pass of a full-size random ARUNet (37.5 M parameters, as the HSF models) per
  engine/precision, batch 1;
* with ``fusion="mean"``, which now inverts each model's prediction instead of their sum: the
  inverse augmentation of ``--models`` predictions against one.

    python benchmarks/spread_cost.py --threads 2 --arunet /tmp/hsf_bench/arunet_random_seed0.onnx

Medians of ``--repeats`` runs in one process (no other work of the run is timed).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hsf_bids.engines import open_network
from hsf_bids.segment import HSF_TTA, FusionAccumulator, sample_augmentation


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 53, 53], help="crop (voxels)")
    parser.add_argument("--labels", type=int, default=6, help="labels after ca_mode merging")
    parser.add_argument("--models", type=int, default=5, help="models of the ensemble")
    parser.add_argument("--arunet", type=Path, help="ARUNet ONNX file (made when missing)")
    parser.add_argument("--engines", nargs="+", default=["onnxruntime/fp32", "openvino/fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--network-repeats", type=int, default=5)
    args = parser.parse_args(argv)

    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((args.labels, *shape)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    accumulator = FusionAccumulator(shape, args.labels)
    winners = np.argmax(probs.reshape(args.labels, -1), axis=0)
    add = median_seconds(lambda: accumulator.add(probs), args.repeats)
    count = median_seconds(
        lambda: np.bincount(winners, minlength=args.labels).astype(np.int64, copy=False),
        args.repeats,
    )
    print(f"crop {shape}, {args.labels} labels, {args.threads} thread(s) for the networks")
    print(f"FusionAccumulator.add (with the count): {add * 1e3:.3f} ms per prediction")
    print(f"added bincount of the argmax:           {count * 1e3:.3f} ms per prediction")

    # An elastic augmentation (the slower kind to invert): the first seed that draws one.
    aug = next(
        a for seed in range(100)
        if (a := sample_augmentation(np.random.default_rng(seed), shape, (1.0, 1.0, 1.0),
                                     HSF_TTA)).kind == "elastic"
    )  # fmt: skip
    stack = np.stack([probs] * args.models)
    aug.invert(probs)  # builds the sampler once, as the ensemble does
    one = median_seconds(lambda: aug.invert(probs), max(3, args.repeats // 3))
    each = median_seconds(lambda: aug.invert(stack), max(3, args.repeats // 3))
    print(f"fusion=mean: inverting the models' sum {one * 1e3:.1f} ms per copy, each of "
          f"{args.models} models {each * 1e3:.1f} ms per copy")  # fmt: skip

    arunet = args.arunet
    if arunet is None or not arunet.is_file():
        arunet = arunet or Path("/tmp/hsf_bench/arunet_random_seed0.onnx")
        arunet.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "hsf_bids.arunet", str(arunet), "--seed", "0"],
                       check=True)  # fmt: skip
    padded = tuple(-(-n // 8) * 8 for n in shape)
    batch = rng.standard_normal((1, 1, *padded)).astype(np.float32)
    for choice in args.engines:
        engine, precision = choice.split("/")
        network = open_network(arunet, engine=engine, precision=precision, threads=args.threads)
        forward = median_seconds(lambda n=network: n.run(batch), args.network_repeats)
        print(
            f"ARUNet forward pass {engine} {precision} {padded}: {forward:.3f} s; the added "
            f"count is {100 * count / forward:.4f} % of it"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
