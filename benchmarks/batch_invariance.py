"""How far sample k moves with the batch size on a real network (README, docs/reliability.md).

The noise of sample k is bit-identical for any batch size (one generator per sample); the network's kernels are
not: their blocking can depend on the batch size. This prints the largest difference between sampling seeds 0-15
in one batch and one at a time (and four at a time), in float32 and float64.

    python benchmarks/batch_invariance.py
"""

import torch

from fewstep import sample, zoo


def main() -> None:
    den = zoo.load("unet_m")
    print("dtype    | max |batch16 - batch1| | max |batch16 - batch4| | max |x|")
    for dtype in (torch.float32, torch.float64):
        den.model.to(dtype)
        den.dtype = dtype

        def run(seeds: object, dtype: torch.dtype = dtype) -> torch.Tensor:
            return sample(den, "dpmpp_2m", 10, shape=(1, 8, 8), seeds=seeds, dtype=dtype)

        whole = run("0-15")
        ones = torch.cat([run([k]) for k in range(16)])
        fours = torch.cat([run(list(range(k, k + 4))) for k in range(0, 16, 4)])
        print(f"{str(dtype):8s} | {float((whole - ones).abs().max()):.2e} | {float((whole - fours).abs().max()):.2e}"
              f" | {float(whole.abs().max()):.3f}")


if __name__ == "__main__":
    main()
