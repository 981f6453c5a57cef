"""Build a Denoiser from a diffusers model and its scheduler config, offline."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fewstep.models.adapter import ModelDenoiser
from fewstep.models.families import family_of
from fewstep.models.scheduler_config import native_time_from_config, schedule_from_config

__all__ = ["denoising_network", "from_diffusers", "network_name", "schedule_from_config"]

def load_json(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (a config, a model card) as a dict; a one-line ``ValueError`` naming the file
    when it is not one."""
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' file name for a weights variant: ``a.b.ext`` -> ``a.b.<variant>.ext``."""
    if variant is None:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def _legacy_variant_index(model_dir: Path, variant: str) -> Path:
    """The older sharded-variant index diffusers falls back to, computed on the whole path string as it does
    (``_fetch_index_file_legacy``), so a dotted folder name points wherever diffusers would look."""
    index = (model_dir / INDEX_NAME).as_posix()
    cut = 3 if ".cache" in index else 2
    parts = index.split(".")
    return Path(".".join([*parts[:cut], variant, *parts[cut:]]))


def _check_safetensors_only(model_dir: Path, variant: str | None = None) -> None:
    """Refuse a model folder whose weights diffusers would read from anything but safetensors.

    diffusers reads ``diffusion_pytorch_model[.<variant>].safetensors`` or, for a sharded checkpoint, the files named
    in ``diffusion_pytorch_model.safetensors.index[.<variant>].json`` (or, for a variant, its older index name); any
    other name (a ``.bin`` beside a stray ``*.safetensors`` file, an index pointing at pickles) would be unpickled,
    so it is refused here, whatever else the folder holds. Every index diffusers might read is checked.
    """
    indexes = [model_dir / _with_variant(INDEX_NAME, variant)]
    if variant is not None:
        indexes.append(_legacy_variant_index(model_dir, variant))
    found = [index for index in indexes if index.is_file()]
    for index in found:
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        bad = sorted({str(f) for f in weight_map.values() if not str(f).endswith(".safetensors")})
        if bad:
            raise ValueError(f"{index} names non-safetensors shards {bad} (fewstep never unpickles weights)")
        missing = sorted({str(f) for f in weight_map.values() if not (model_dir / str(f)).is_file()})
        if missing:
            raise ValueError(f"{index} names missing shards {missing}")
    weights = _with_variant(WEIGHTS_NAME, variant)
    if not found and not (model_dir / weights).is_file():
        raise ValueError(f"{model_dir} has no {weights} (fewstep loads safetensors only, never pickles)")


def _load_safetensors_model(model_cls: Any, model_dir: Path, *, variant: str | None = None,
                            torch_dtype: Any = None) -> Any:
    """``model_cls.from_pretrained(model_dir)`` from safetensors only, offline, refusing incomplete checkpoints.

    ``use_safetensors=True`` makes diffusers raise instead of falling back to a pickled ``.bin``; a checkpoint
    with a tensor missing, an unexpected tensor or a tensor of the wrong shape is refused (diffusers would only
    warn and leave freshly initialised weights in the model).
    """
    from diffusers.utils import logging as diffusers_logging

    _check_safetensors_only(model_dir, variant)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "newly initialized" warning is replaced by our refusal below
    try:
        model, info = model_cls.from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False,
                                                use_safetensors=True, output_loading_info=True, variant=variant,
                                                torch_dtype=torch_dtype)
    except Exception as err:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load a {model_cls.__name__} from {model_dir}: {first}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or []]
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]).splitlines()[0])
    if problems:
        raise ValueError(f"refusing the incomplete checkpoint in {model_dir}: {'; '.join(problems)}")
    if torch_dtype is not None:
        _cast_floating(model, torch_dtype)
    return model


def _cast_floating(model: Any, dtype: Any) -> None:
    """Every floating tensor of ``model`` in ``dtype``, except those of its ``_keep_in_fp32_modules``.

    Without accelerate (``low_cpu_mem_usage=False``) diffusers may assign the checkpoint's tensors as they are when
    the first one already has the model's dtype (a float32 buffer first, as in SD3), leaving float32 weights behind
    ``torch_dtype=float16``; this finishes the cast it meant to do.
    """
    from itertools import chain

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)


def from_diffusers(model: Any, scheduler_or_config: Any = None, *, variant: str | None = None,
                   torch_dtype: Any = None, device: Any = None, subfolder: str | None = None,
                   image_seq_len: int | None = None, mu: float | None = None) -> ModelDenoiser:
    """A :class:`ModelDenoiser` for a diffusers model, called as its family wants (:mod:`fewstep.models.families`:
    ``UNet2DModel``, ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL), ``DiTTransformer2DModel``,
    ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
    ``SanaTransformer2DModel``); any other class is refused.

    Args:
        model: a diffusers model instance, a loaded pipeline (its ``unet`` or ``transformer``, with its own
            scheduler unless another is given), or a local folder: a pipeline folder (with ``unet/`` or
            ``transformer/`` and ``scheduler/``) or a model folder (``config.json`` + ``.safetensors`` weights; pickled
            ``.bin`` checkpoints are refused). Loaded with ``local_files_only=True``; nothing is downloaded.
        scheduler_or_config: a diffusers scheduler, its ``.config``, a dict, or a path to a
            ``scheduler_config.json`` or its folder. Defaults to ``scheduler/`` beside or inside the model folder.
        variant: weights variant of a folder: ``diffusion_pytorch_model.<variant>.safetensors`` (e.g. ``"fp16"``).
        torch_dtype: dtype to load the weights in (the denoiser runs in it; ``den.dtype``).
        device: device to put the model on. With a model instance, ``torch_dtype`` and ``device`` move it in place
            (``nn.Module.to``).
        subfolder: the model's folder inside ``model`` (e.g. ``"transformer"``); default: ``unet/`` or
            ``transformer/`` when present, else the folder itself.
        image_seq_len, mu: for a scheduler config with ``use_dynamic_shifting`` (Flux, SD3.5), whose flow shift
            depends on the image size: the latent's token count (Flux: ``(H / 2) * (W / 2)`` of the latent) or the
            pipeline's ``mu`` directly; the denoiser is then for that size (see
            :func:`fewstep.models.scheduler_config.schedule_from_config`). Without either, the shift is the one of
            the model's default size (``den.sample_shape``) and the denoiser refuses latents of another size.

    Conditioning passes through ``cond`` with the keywords of the model's ``forward`` (e.g.
    ``{"encoder_hidden_states": emb}``, ``{"class_labels": y}``, SDXL's ``added_cond_kwargs``, SD3's and Flux's
    ``pooled_projections``, Flux's ``guidance``); tensors of batch 1 are broadcast to the batch. A class-conditional
    DiT gets its null label by default (unconditional sampling; guide with ``ClassifierFreeGuidance(den, scale)``
    and ``cond={"class_labels": y}``). ``den.sample_shape`` is the state's ``(channels, height, width)``.
    The scheduler config read is kept as ``.scheduler_config``.
    """
    import diffusers  # imported here: diffusers is heavy and only this adapter needs it

    if variant is not None and not (isinstance(variant, str) and re.fullmatch(r"[A-Za-z0-9_-]+", variant)):
        raise ValueError(f"variant must be a name such as 'fp16' (letters, digits, '_' or '-'), got {variant!r}")
    if subfolder is not None and not (isinstance(subfolder, str) and subfolder
                                      and not Path(subfolder).is_absolute() and ".." not in Path(subfolder).parts):
        raise ValueError(f"subfolder must be a relative folder name inside the model folder, got {subfolder!r}")
    model_dir: Path | None = None
    if isinstance(model, str | os.PathLike):
        root = Path(model)
        if not root.is_dir():
            raise ValueError(f"no diffusers model folder at {root}")
        model_dir = root
        if subfolder is not None:
            model_dir = root / subfolder
        else:
            for sub in ("unet", "transformer"):
                if (root / sub / "config.json").is_file():
                    model_dir = root / sub
                    break
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} has no config.json; not a diffusers model folder")
        class_name = load_json(config_path).get("_class_name")
        model_cls = getattr(diffusers, str(class_name), None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, diffusers.ModelMixin)):
            raise ValueError(f"{config_path} names unknown diffusers class {class_name!r}")
        family_of(model_cls)  # an unsupported class is refused before its weights are read
        model = _load_safetensors_model(model_cls, model_dir, variant=variant, torch_dtype=torch_dtype)
    elif variant is not None or subfolder is not None:
        raise ValueError("variant= and subfolder= choose files in a model folder; this model is already loaded")
    elif not isinstance(model, torch.nn.Module) and hasattr(model, "scheduler"):  # a loaded pipeline
        if scheduler_or_config is None:
            scheduler_or_config = model.scheduler
        model = denoising_network(model)
    family = family_of(model)
    if torch_dtype is not None and model_dir is None:  # a folder was loaded in torch_dtype already
        _cast_floating(model, torch_dtype)
    if device is not None:
        model = model.to(device=device)
    if scheduler_or_config is None:
        if model_dir is None:
            raise ValueError("pass the scheduler (or its config) that the model was trained with")
        candidates = [model_dir.parent / "scheduler", model_dir / "scheduler", model_dir]
        found = [c / "scheduler_config.json" for c in candidates if (c / "scheduler_config.json").is_file()]
        if not found:
            raise ValueError(f"no scheduler_config.json found near {model_dir}")
        scheduler_or_config = found[0]
    if isinstance(scheduler_or_config, str | os.PathLike):
        p = Path(scheduler_or_config)
        config = load_json(p / "scheduler_config.json" if p.is_dir() else p)
    elif isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
    elif hasattr(scheduler_or_config, "config"):
        config = dict(scheduler_or_config.config)
        config.setdefault("_class_name", type(scheduler_or_config).__name__)
    else:
        raise TypeError(f"cannot read a scheduler config from {type(scheduler_or_config).__name__}")
    shift_size = None
    if config.get("use_dynamic_shifting") and image_seq_len is None and mu is None:
        # The flow shift depends on the image size: take the model's default size and hold the denoiser to it.
        _, height, width = family.sample_shape(model)
        shift_size, image_seq_len = (height, width), family.image_seq_len(model, height, width)
    schedule, prediction = schedule_from_config(config, image_seq_len, mu=mu)
    native = family.native_time(model, schedule, native_time_from_config(config, schedule))
    den = ModelDenoiser(model, schedule, prediction=prediction, native_time=native, family=family)
    den.shift_size = shift_size
    den.scheduler_config = config  # kept so diffusers' schedulers can be run as peers on the same model
    return den


def network_name(pipe: Any) -> str:
    """The name of a pipeline's denoising network component (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer")


def denoising_network(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoising network (``unet`` or ``transformer``)."""
    return getattr(pipe, network_name(pipe))
