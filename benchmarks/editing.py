"""Inversion and editing on the zoo: invert real digits, regenerate them exactly (BDIA) or not (DDIM), and edit
them by mixing fresh noise into the inverted latent.

    python benchmarks/editing.py [--model unet_m] [--steps 20] [--out docs/zoo/editing.png]

Prints the round-trip errors and, per mixing angle, the fraction of edits the shipped classifier still reads as
the input's class and the mean pixel change; writes an image grid (rows: input, reconstructions, edits).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from fewstep import invert, make_solver, regenerate, sample, zoo
from fewstep.data import digits_tensor
from fewstep.noise import SampleNoise
from fewstep.outputs import mosaic

ANGLES = (0.25, 0.5, 0.75)  # fraction of a right angle: latent' = cos(a) x_T + sin(a) z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=64, help="digits to invert (the grid shows the first 10)")
    parser.add_argument("--out", default="docs/zoo/editing.png")
    args = parser.parse_args()

    den = zoo.load(args.model)
    den.model.double()
    den.dtype = torch.float64  # float64 so the exact round trip is visible at its true precision
    classifier = zoo.load_classifier()
    images, labels = digits_tensor()
    # the first occurrence of each class, then the following digits
    order = [int((labels == c).nonzero()[0]) for c in range(10)]
    order += [i for i in range(len(labels)) if i not in order][: max(args.n - 10, 0)]
    x0, y = images[order].double(), labels[order]

    rows: dict[str, torch.Tensor] = {"input": x0}
    for name in ("bdia", "ddim"):
        inv = invert(den, x0, solver=make_solver(name), steps=args.steps, grid="time_quadratic")
        rec = regenerate(den, inv)
        err = float((rec - x0).abs().max() / x0.abs().max())
        print(f"{name:5s} round trip, {args.steps} steps: max relative error {err:.2e} ({inv.nfe} NFE to invert)")
        rows[f"{name} round trip"] = rec
        if name == "bdia":
            latent, times = inv.x_T, inv.times
    fresh = SampleNoise(list(range(1000, 1000 + len(order))), tuple(x0.shape[1:]), dtype=torch.float64).draw()
    with torch.no_grad():
        base = classifier(x0.float()).argmax(1)
    print(f"classifier reads the inputs as their labels: {float((base == y).double().mean()):.2f}")
    for a in ANGLES:
        theta = a * math.pi / 2
        mixed = math.cos(theta) * latent + math.sin(theta) * fresh
        edit = sample(den, make_solver("bdia"), times, x_init=mixed)
        with torch.no_grad():
            kept = float((classifier(edit.float()).argmax(1) == base).double().mean())
        change = float((edit - x0).abs().mean())
        print(f"mix {a:.2f} of a right angle: class kept {kept:.2f}, mean |pixel change| {change:.3f}")
        rows[f"mix {a:.2f}"] = edit

    from PIL import Image, ImageDraw

    tiles = {k: mosaic(v[:10].float(), cols=10) for k, v in rows.items()}
    th, tw = next(iter(tiles.values())).shape
    left = 130
    img = Image.new("L", (left + tw, len(tiles) * (th + 6) + 6), 255)
    draw = ImageDraw.Draw(img)
    for i, (k, tile) in enumerate(tiles.items()):
        draw.text((4, 6 + i * (th + 6) + th // 2 - 6), k, fill=0)
        img.paste(Image.fromarray(tile), (left, 6 + i * (th + 6)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
