"""Build a Denoiser from a diffusers model and its scheduler config, offline."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.models.adapter import ModelDenoiser
from fewstep.schedules import DiscreteVP, NoiseSchedule, RectifiedFlow

__all__ = ["from_diffusers", "schedule_from_config"]

_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def schedule_from_config(config: Mapping[str, Any]) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction type) from a diffusers scheduler config (a dict or a scheduler's ``.config``).

    DDPM-family configs (``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``,
    ``trained_betas``, ``prediction_type``) give a :class:`DiscreteVP` whose table is computed in float32 as
    diffusers does, so grids on its integer timesteps match diffusers bit for bit in the table.
    ``FlowMatchEulerDiscreteScheduler`` configs give :class:`RectifiedFlow` (flow prediction).
    """
    cfg = dict(config)
    cls = cfg.get("_class_name", "")
    n = int(cfg.get("num_train_timesteps", 1000))
    if cls.startswith("FlowMatch"):
        return RectifiedFlow(t_min=1.0 / n, t_max=1.0 - 1e-6), "flow"
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ValueError(f"unsupported diffusers prediction_type {prediction!r}; expected one of {list(_PREDICTION)}")
    trained = cfg.get("trained_betas")
    name = cfg.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
    elif name in ("linear", "scaled_linear", "squaredcos_cap_v2"):  # diffusers' float32 table, bit for bit
        return DiscreteVP.named(name, num_train_timesteps=n, beta_start=cfg.get("beta_start", 1e-4),
                                beta_end=cfg.get("beta_end", 0.02)), _PREDICTION[prediction]
    else:
        raise ValueError(f"unsupported diffusers beta_schedule {name!r}")
    # diffusers computes the table with torch in float32; do the same so integer timesteps match exactly.
    alphas_cumprod = torch.cumprod(1.0 - torch.from_numpy(betas), dim=0)
    return DiscreteVP(alphas_cumprod.double().numpy()), _PREDICTION[prediction]


def _load_config(path: Path) -> dict[str, Any]:
    """A JSON config file as a dict; a one-line ``ValueError`` naming the file when it is not one."""
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


def _check_safetensors_only(model_dir: Path) -> None:
    """Refuse a model folder whose weights diffusers would read from anything but safetensors.

    diffusers reads ``diffusion_pytorch_model.safetensors`` or, for a sharded checkpoint, the files named in
    ``diffusion_pytorch_model.safetensors.index.json``; any other name (a ``.bin`` beside a stray ``*.safetensors``
    file, an index pointing at pickles) would be unpickled, so it is refused here, whatever else the folder holds.
    """
    index = model_dir / (WEIGHTS_NAME + ".index.json")
    if index.is_file():
        weight_map = _load_config(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        bad = sorted({str(f) for f in weight_map.values() if not str(f).endswith(".safetensors")})
        if bad:
            raise ValueError(f"{index} names non-safetensors shards {bad} (fewstep never unpickles weights)")
        missing = sorted({str(f) for f in weight_map.values() if not (model_dir / str(f)).is_file()})
        if missing:
            raise ValueError(f"{index} names missing shards {missing}")
    elif not (model_dir / WEIGHTS_NAME).is_file():
        raise ValueError(f"{model_dir} has no {WEIGHTS_NAME} (fewstep loads safetensors only, never pickles)")


def _load_safetensors_model(model_cls: Any, model_dir: Path) -> Any:
    """``model_cls.from_pretrained(model_dir)`` from safetensors only, offline, refusing incomplete checkpoints.

    ``use_safetensors=True`` makes diffusers raise instead of falling back to a pickled ``.bin``; a checkpoint
    with a tensor missing, an unexpected tensor or a tensor of the wrong shape is refused (diffusers would only
    warn and leave freshly initialised weights in the model).
    """
    from diffusers.utils import logging as diffusers_logging

    _check_safetensors_only(model_dir)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "newly initialized" warning is replaced by our refusal below
    try:
        model, info = model_cls.from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False,
                                                use_safetensors=True, output_loading_info=True)
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
    return model


def from_diffusers(model: Any, scheduler_or_config: Any = None) -> ModelDenoiser:
    """A :class:`ModelDenoiser` for a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, a DiT, ...).

    Args:
        model: a diffusers model instance, or a local folder: a pipeline folder (with ``unet/`` or
            ``transformer/`` and ``scheduler/``) or a model folder (``config.json`` + ``.safetensors`` weights; pickled
            ``.bin`` checkpoints are refused). Loaded with ``local_files_only=True``; nothing is downloaded.
        scheduler_or_config: a diffusers scheduler, its ``.config``, a dict, or a path to a
            ``scheduler_config.json`` or its folder. Defaults to ``scheduler/`` beside or inside the model folder.

    Conditioning passes through ``cond`` (e.g. ``{"encoder_hidden_states": emb}`` or ``{"class_labels": y}``); a
    class-conditional DiT gets its null label by default (unconditional sampling; guide with
    ``ClassifierFreeGuidance(den, scale)`` and ``cond={"class_labels": y}``).
    The scheduler config read is kept as ``.scheduler_config``.
    """
    import diffusers  # imported here: diffusers is heavy and only this adapter needs it

    model_dir: Path | None = None
    if isinstance(model, str | os.PathLike):
        root = Path(model)
        if not root.is_dir():
            raise ValueError(f"no diffusers model folder at {root}")
        model_dir = root
        for sub in ("unet", "transformer"):
            if (root / sub / "config.json").is_file():
                model_dir = root / sub
                break
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} has no config.json; not a diffusers model folder")
        class_name = _load_config(config_path).get("_class_name")
        model_cls = getattr(diffusers, str(class_name), None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, diffusers.ModelMixin)):
            raise ValueError(f"{config_path} names unknown diffusers class {class_name!r}")
        model = _load_safetensors_model(model_cls, model_dir)
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
        config = _load_config(p / "scheduler_config.json" if p.is_dir() else p)
    elif isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
    elif hasattr(scheduler_or_config, "config"):
        config = dict(scheduler_or_config.config)
        config.setdefault("_class_name", type(scheduler_or_config).__name__)
    else:
        raise TypeError(f"cannot read a scheduler config from {type(scheduler_or_config).__name__}")
    schedule, prediction = schedule_from_config(config)
    native = None
    if isinstance(schedule, RectifiedFlow):
        n = int(config.get("num_train_timesteps", 1000))
        native = lambda t: t * n  # noqa: E731  (diffusers flow models take sigma * N)
    default_cond = None
    if type(model).__name__ == "DiTTransformer2DModel" and model.config.num_embeds_ada_norm:
        # the label table has a null class at index num_classes (class dropout): unconditional by default
        import torch

        default_cond = {"class_labels": torch.tensor(int(model.config.num_embeds_ada_norm))}
    den = ModelDenoiser(model, schedule, prediction=prediction, native_time=native, default_cond=default_cond)
    den.scheduler_config = config  # kept so diffusers' schedulers can be run as peers on the same model
    return den
