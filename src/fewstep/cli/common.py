"""What the commands share: argument types (each a one-line error), the parser that prints one-line errors, and
the checks of ``--option``, ``--label`` and a plan's device."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

import torch

from fewstep.conditioning import Labels, Prompts
from fewstep.grids import MAX_STEPS
from fewstep.models.base import Cond
from fewstep.noise import parse_seeds
from fewstep.plan import Plan
from fewstep.quant import SCHEMES
from fewstep.spec import parse_options

__all__ = ["Parser", "Subparsers", "class_labels", "device", "int_list", "options", "plan_device", "positive_int",
           "scheme_list", "seed_spec", "seeds", "step_count", "step_list"]

Subparsers = argparse._SubParsersAction  # what each command's add_parser adds its parser to


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where help is, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def int_list(text: str, *, most: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    if most is not None and max(values) > most:
        raise argparse.ArgumentTypeError(f"at most {most:,}, got {max(values):,}")
    return values


def step_list(text: str) -> list[int]:
    return int_list(text, most=MAX_STEPS)


def step_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_STEPS:,} steps, got {value:,}")
    return value


def device(text: str) -> str:
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here")
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def seed_spec(text: str) -> str:
    """A seed range kept as written (it names the noise in the results database), validated."""
    seeds(text)
    return text


def scheme_list() -> str:
    """The quantization schemes, for help texts."""
    return ", ".join(SCHEMES) + " (wNaM and fp:eXmY take any widths)"


def options(items: list[str] | None) -> dict[str, object]:
    """``["eta=1", "variant=bh1"]`` -> ``{"eta": 1, "variant": "bh1"}`` (values parsed as JSON when they can be)."""
    return parse_options(items or [])


def plan_device(plan: Plan) -> None:
    """A plan's device, checked as ``--device`` is (a CUDA device where there is none is refused)."""
    try:
        device(plan.device)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"device {err}") from None


def class_labels(den: Any, label: str | None, n: int, *, what: str = "--label") -> Cond:
    """``cond`` for ``--label`` (:class:`fewstep.conditioning.Labels`: an int in the model's class range, a list or
    range of them, or ``cycle``; refused on other models); ``None`` without one."""
    source = Labels.of(label, what=what)
    return None if source is None else source.cond(den, n)


def add_prompt_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--prompt``, ``--prompts FILE`` and ``--negative-prompt`` of a command that runs a Stable Diffusion
    1.x/2.x, SDXL or SD3 pipeline folder; ``what`` says whose prompts they are ("every seed", "the calibration
    seeds")."""
    parser.add_argument("--prompt", default=None,
                        help=f"a text-to-image pipeline folder (--model): the prompt of {what}, encoded by the "
                             "pipeline's own text encoder")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help=f"pipeline folders: the prompts of {what}, one per line, cycled over the seeds")
    parser.add_argument("--negative-prompt", default=None,
                        help="pipeline folders: guidance's negative prompt (default: the empty prompt)")


def prompt_source(args: argparse.Namespace, *, labelled: bool, guided: bool) -> Prompts | None:
    """``--prompt``/``--prompts`` (with ``--negative-prompt``) as one source, ``None`` without; refused with
    class labels (``labelled``) or a negative prompt without guidance (``guided``), before any work."""
    if args.prompt is not None and args.prompts is not None:
        raise ValueError("give --prompt or --prompts, not both")
    if args.prompt is None and args.prompts is None:
        if args.negative_prompt is not None:
            raise ValueError("--negative-prompt goes with --prompt or --prompts")
        return None
    if labelled:
        raise ValueError("--prompt/--prompts condition a text-to-image pipeline, --label a class-conditional model; "
                         "give one")
    if args.negative_prompt is not None and not guided:
        raise ValueError("--negative-prompt is guidance's negative branch: give --guidance too")
    negative = args.negative_prompt or ""
    if args.prompts is not None:
        return Prompts.from_file(args.prompts, negative=negative)
    return Prompts((args.prompt,), negative, "--prompt")


def check_guidance(den: Any, guidance: float | None) -> None:
    """Guidance without prompts needs a model with a null condition of its own (a class-conditional DiT's null
    label): on any other model both branches would be the same call, a guided run the unguided one at twice the
    cost."""
    if guidance is not None and "class_labels" not in (getattr(den, "default_cond", {}) or {}):
        raise ValueError("--guidance needs a model with a null condition (a class-conditional DiT such as dit_s) or "
                         "a pipeline's prompts (--prompt, --prompts)")
