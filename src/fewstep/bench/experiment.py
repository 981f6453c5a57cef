"""``Experiment``: a frozen, serialisable description of one sampling run, and sweeps of them."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from fewstep.conditioning import Labels
from fewstep.grids import DEFAULT_GRID, GRIDS, suggest
from fewstep.noise import parse_seeds
from fewstep.solvers import SOLVERS

if TYPE_CHECKING:
    from fewstep.plan import Plan

__all__ = ["BACKENDS", "QUANT_REV", "Experiment", "sweep"]

BACKENDS = ("fewstep", "diffusers")


QUANT_REV = 2
"""Revision of what a quantization scheme string means, in quantized experiments' keys: 2 = GPTQ rounding on the
calibration trajectory and the first and last layers in float by default (1, keyless: every layer to nearest)."""


@dataclass(frozen=True)
class Experiment:
    """One row of a sweep: a run and the noise it starts from. A fewstep row's run is one
    :class:`~fewstep.plan.Plan` (:meth:`as_plan`: the runner builds every fewstep row through ``Plan.build``); a
    diffusers row's run is diffusers' own scheduler of that name on the same network and noise. The fields are the
    row's identity in the store, kept as they were so stored rows keep their keys.

    ``model`` (zoo name or diffusers folder) sampled by ``solver`` in ``steps`` steps on ``grid``
    (:data:`fewstep.grids.DEFAULT_GRID` by default, as every run description) from the noise of ``seeds``.

    ``backend="diffusers"`` runs the diffusers scheduler of that name (see :data:`fewstep.bench.peers.PEERS`) on
    the same network and starting noise, with pinned configs; ``grid`` is then diffusers' own (trailing spacing).
    ``options`` are solver knobs (fewstep) or scheduler config overrides (diffusers).

    ``cache``: a fewstep cache spec (:func:`fewstep.caching.cache_from_spec`), or ``"diffusers:<hook>..."``, one of
    diffusers' own cache hooks around the same network (:mod:`fewstep.bench.cache_peers`).

    ``dtype``, ``device``: the network runs in ``dtype`` on ``device``, and so does the state, except that
    float16/bfloat16 runs keep it in float32 (as :attr:`fewstep.plan.Plan.dtype`); a run elsewhere is another
    experiment, while the defaults (float32 on the CPU) leave the key as it was before these fields existed.

    ``quant``: a quantization scheme for the network (:data:`fewstep.quant.SCHEMES`; ``""`` for none), applied as
    :meth:`fewstep.plan.Plan.build` does (calibrated on this experiment's own solver, steps and grid: activation
    ranges, GPTQ weight rounding); part of the key only when set, so unquantized experiments keep the keys they had
    before it existed. A quantized key also holds :data:`QUANT_REV`, so rows stored before GPTQ rounding and float
    ends became the defaults are not taken for this revision's.

    ``labels``: the conditioning source of the seeds (:class:`fewstep.conditioning.Labels`: a class, a list or
    range cycled over the seeds, or ``cycle``; ``""``: the model's default conditioning), the same for the row, its
    reference and diffusers' rows; part of the key only when set.

    ``plan`` (with its row label ``name``): a :class:`~fewstep.plan.Plan`'s JSON, run as ``Plan.build`` makes it
    (see :meth:`of_plan`); the other fields then repeat the plan's, and the key covers the whole plan, so an edited
    plan is a new experiment.
    """

    model: str
    solver: str
    steps: int
    grid: str = DEFAULT_GRID
    seeds: str = "0-255"
    backend: str = "fewstep"
    options: Mapping[str, Any] = field(default_factory=dict)
    cache: str = ""  # a cache spec: "deepcache:interval=3", "auto:target_error=0.05", "diffusers:fbcache"
    plan: Mapping[str, Any] | None = None  # Plan.to_dict() of a plan experiment
    name: str = ""  # a plan experiment's row label (its file's stem)
    dtype: str = "float32"  # of the network (fewstep.plan.DTYPES); float16/bfloat16 keep a float32 state
    device: str = "cpu"  # where the network, the noise and the state go (references and errors stay on the CPU)
    quant: str = ""  # a quantization scheme: "int8wo", "w8", "w4a8" (fewstep.quant.SCHEMES)
    labels: str = ""  # the conditioning source: class labels "3", "0-4", "cycle" (fewstep.conditioning.Labels)

    def __post_init__(self) -> None:
        from fewstep.bench.peers import PEERS
        from fewstep.plan import placement

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        known = SOLVERS if self.backend == "fewstep" else PEERS
        if self.solver not in known:
            raise ValueError(f"unknown {self.backend} solver {self.solver!r}{suggest(self.solver, known)}; "
                             f"known: {', '.join(known)}")
        placement(self.dtype, self.device)
        if not isinstance(self.quant, str):
            raise ValueError(f"quant must be a scheme string such as 'int8wo' ('' for none), got {self.quant!r}")
        if self.quant.strip() == "none":
            object.__setattr__(self, "quant", "")
        if self.quant:
            from fewstep.quant.schemes import parse_scheme

            parse_scheme(self.quant)
            if self.backend != "fewstep":
                raise ValueError("quantization applies to fewstep runs only")
        if self.plan is not None:
            self._check_plan()
        elif self.name:
            raise ValueError(f"name={self.name!r} labels a plan experiment; this one has no plan")
        if self.grid not in GRIDS and not (self.plan is not None and self.grid == "explicit"):
            raise ValueError(f"unknown grid {self.grid!r}{suggest(self.grid, GRIDS)}; known grids: {', '.join(GRIDS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        parse_seeds(self.seeds)
        if not isinstance(self.labels, str):
            raise ValueError(f"labels must be a spec string such as '3', '0-4' or 'cycle' ('' for none), "
                             f"got {self.labels!r}")
        Labels.of(self.labels)  # its syntax; the classes are checked against the model when it runs
        if self.cache and self.backend != "fewstep":
            raise ValueError("caches apply to fewstep runs only")
        object.__setattr__(self, "options", dict(sorted(dict(self.options).items())))
        if self.backend == "fewstep" and self.plan is None:
            self.as_plan()  # the solver's knobs, the cache and quantization as a plan checks them

    @property
    def conditioning(self) -> Labels | None:
        """The conditioning source of the seeds (``None``: the model's default conditioning)."""
        return Labels.of(self.labels)

    @property
    def diffusers_cache(self) -> str:
        """The diffusers cache hook spec this fewstep row runs around its network (``"diffusers:..."``), or ``""``."""
        return self.cache if self.cache.startswith("diffusers:") else ""

    def as_plan(self) -> Plan:
        """This fewstep row's run as one :class:`~fewstep.plan.Plan`: a plan row's own plan, else the plan of its
        fields (all but a diffusers cache hook, which is no fewstep cache: the runner puts it around the network
        the plan builds)."""
        from fewstep.plan import Plan

        if self.backend != "fewstep":
            raise ValueError(f"a {self.backend} row runs diffusers' own scheduler, not a fewstep plan")
        if self.plan is not None:
            return Plan.from_dict(self.plan)
        return Plan(model=self.model, solver=self.solver, solver_options=self.options, grid=self.grid,
                    steps=self.steps, cache="" if self.diffusers_cache else self.cache, dtype=self.dtype,
                    device=self.device, quant=self.quant)

    @classmethod
    def of_plan(cls, plan: Plan, *, name: str, seeds: str = "0-255", labels: str = "") -> Experiment:
        """The experiment that runs ``plan`` on its own model from the noise of ``seeds`` (conditioned on
        ``labels``), labelled ``name``."""
        return cls(plan.model, plan.solver, int(plan.steps or 0), plan.grid, seeds, options=plan.solver_options,
                   cache=plan.cache, plan=plan.to_dict(), name=name, dtype=plan.dtype, device=plan.device,
                   quant=plan.quant, labels=labels)

    def unquantized(self) -> Experiment:
        """This experiment on the float network: everything else (noise, solver, steps, grid, cache, dtype, device;
        a plan's other fields) the same."""
        if self.plan is None:
            return replace(self, quant="")
        from fewstep.plan import Plan

        plan = replace(Plan.from_dict(self.plan), quant="")
        return Experiment.of_plan(plan, name=self.name, seeds=self.seeds, labels=self.labels)

    def _check_plan(self) -> None:
        from fewstep.plan import Plan

        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a plan experiment needs a name (its row label)")
        if self.backend != "fewstep":
            raise ValueError("plans run on the fewstep backend")
        plan = Plan.from_dict(self.plan)
        object.__setattr__(self, "plan", plan.to_dict())  # canonical: the key is the plan's content
        mine = (self.model, self.solver, self.steps, self.grid, dict(self.options), self.cache, self.dtype, self.device,
                self.quant)
        if mine != (plan.model, plan.solver, plan.steps, plan.grid, dict(plan.solver_options), plan.cache, plan.dtype,
                    plan.device, plan.quant):
            raise ValueError(f"plan experiment {self.name!r}: its fields differ from its plan's "
                             "(make it with Experiment.of_plan)")

    @property
    def label(self) -> str:
        if self.plan is not None:
            return self.name
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        name = self.solver + (f"({opts})" if opts else "") + (f"+{self.cache}" if self.cache else "")
        labels = f"labels={self.labels}" if self.labels else ""
        where = ", ".join(v for v, default in ((labels, ""), (self.quant, ""), (self.device, "cpu"),
                                               (self.dtype, "float32")) if v != default)
        name += f" [{where}]" if where else ""
        return f"diffusers:{name}" if self.backend == "diffusers" else name

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "options": dict(self.options)}
        if not self.cache:  # keeps the keys of cache-free experiments as they were before caches existed
            del out["cache"]
        if self.plan is None:  # and those of experiments that are no plan's, as before plans existed
            del out["plan"], out["name"]
        else:
            out["plan"] = dict(self.plan)
        # float32 on the CPU keeps the keys as they were before dtypes and devices existed; a plan's are in the plan
        if self.plan is not None or self.dtype == "float32":
            del out["dtype"]
        if self.plan is not None or self.device == "cpu":
            del out["device"]
        if not self.labels:  # keys of rows on the model's default conditioning, as before sources existed
            del out["labels"]
        if self.plan is not None or not self.quant:  # unquantized keys as before quantization existed
            del out["quant"]
        else:  # rows of the first revision rounded every layer to nearest: not this revision's results
            out["quant_rev"] = QUANT_REV
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        names = {f.name for f in fields(cls)} | {"quant_rev"}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown experiment fields {sorted(unknown)}; expected {sorted(names)}")
        body = dict(data)
        body.pop("quant_rev", None)
        if body.get("plan") is not None:  # a plan experiment's dtype and device are its plan's (to_dict)
            from fewstep.plan import Plan

            plan = Plan.from_dict(body["plan"])
            body.setdefault("dtype", plan.dtype)
            body.setdefault("device", plan.device)
            body.setdefault("quant", plan.quant)
        return cls(**body)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Experiment:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> Experiment:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    @property
    def key(self) -> str:
        """Content hash of the canonical JSON: the identity of a result in the database."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:16]


def sweep(
    models: Sequence[str],
    solvers: Sequence[str],
    steps: Iterable[int],
    *,
    grid: str = DEFAULT_GRID,
    seeds: str = "0-255",
    with_diffusers: bool = False,
    peers: Sequence[str] = (),
    caches: Sequence[str] = ("",),
    plans: Mapping[str, Plan] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    quants: Sequence[str] = ("",),
    labels: str = "",
) -> list[Experiment]:
    """The product models x solvers x steps (fewstep), plus diffusers' counterpart of each solver that has one
    (``with_diffusers``) and any diffusers ``peers`` named explicitly (e.g. ``"SA-Solver"``). A solver may carry
    knobs as a spec, ``"sa_solver:tau=0:predictor_order=3"``; each fewstep run is repeated for every cache spec of
    ``caches`` (``""`` or ``"none"``: uncached).

    Not every diffusers scheduler can drive every model (DDPM-family schedulers need a beta schedule; a
    rectified-flow model runs only with ``Euler``, see :func:`fewstep.bench.peers.compatible`). A peer named in
    ``peers`` that cannot drive one of ``models`` is refused here, before anything runs, with a ``ValueError``
    naming the peers that do apply; an automatic counterpart (``with_diffusers``) that does not apply to a model is
    skipped for that model, since nobody asked for it by name.

    ``plans``: row label -> :class:`~fewstep.plan.Plan`; each is one more experiment, on the plan's own model
    (whether or not it is in ``models``), from the same ``seeds``. A label that another row of that model already
    has is refused.

    ``dtype``, ``device``: where the fewstep and diffusers runs go (:class:`Experiment`); plans run as they say.
    ``quants``: quantization schemes each fewstep run is repeated with (``""`` or ``"none"``: the float network);
    diffusers rows run the float network. ``labels``: the conditioning source of every row (:class:`Experiment`)."""
    from fewstep.bench.peers import PEERS, applicable, compatible, counterpart
    from fewstep.plan import placement
    from fewstep.spec import parse_spec

    placement(dtype, device)
    steps = list(steps)
    specs = [parse_spec(s) for s in solvers]
    caches = ["" if c in ("", "none") else c for c in caches]
    quants = list(dict.fromkeys("" if q.strip() in ("", "none") else q.strip() for q in quants))
    out = [Experiment(m, name, n, grid, seeds, options=opts, cache=c, dtype=dtype, device=device, quant=q,
                      labels=labels)
           for m, (name, opts), n, c, q in itertools.product(models, specs, steps, caches, quants)]
    for p in peers:  # up front: an unknown label must not pass silently as 'not applicable'
        if p not in PEERS:
            raise ValueError(f"unknown diffusers solver {p!r}{suggest(p, PEERS)}; known: {', '.join(PEERS)}")
    named = list(dict.fromkeys(peers))
    chosen = [p for name, _ in specs if (p := counterpart(name)) is not None] if with_diffusers else []
    for m in models:
        config = _scheduler_config(m) if named or chosen else {}
        for p in named:
            if not compatible(p, config):
                raise ValueError(f"diffusers peer {p!r} cannot run model {m!r} (its scheduler is "
                                 f"{config.get('_class_name')}); peers that apply to it: "
                                 + ", ".join(applicable(config)))
        auto = [p for p in chosen if compatible(p, config)]
        out += [Experiment(m, p, n, grid, seeds, backend="diffusers", dtype=dtype, device=device, labels=labels)
                for p, n in itertools.product(dict.fromkeys([*auto, *named]), steps)]
    taken = {(e.model, e.label) for e in out}
    for name, plan in (plans or {}).items():
        if (plan.model, name) in taken:
            raise ValueError(f"plan {name!r} has the label of another {plan.model} row; rename the plan file")
        out.append(Experiment.of_plan(plan, name=name, seeds=seeds, labels=labels))
    return out


def _scheduler_config(model: str) -> dict[str, Any]:
    """The scheduler config beside a zoo model or diffusers folder (empty when there is none)."""
    from fewstep.zoo import model_path

    try:
        folder = model_path(model)
    except ValueError:
        return {}
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}
