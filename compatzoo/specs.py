"""Pydantic specs for components and whole upgrade experiments.

A component is named by ``name`` and carries ``params``; validation looks the name up in
the registry and validates the params with the plugin's own model, so a typo anywhere in
a spec is reported with its full path before anything runs.

Specs are strict where silence hurts: a key given twice in a YAML mapping is an error
(:class:`SpecLoader`), numbers and booleans are never converted from strings or from each
other (:func:`validate_model`), and values that could only fail later (a seed numpy
refuses, an NFR@k of 0, a device torch cannot parse) fail here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_serializer, model_validator)

from compatzoo.engine.fitting import Recipe
from compatzoo.errors import CompatzooError, PluginError, PluginLoadError, SpecError
from compatzoo.registry import get_registry

SEED_MAX = 2**32 - 1
"""The largest seed: numpy's ``np.random.seed`` takes [0, 2**32 - 1] and torch takes it too."""


# --------------------------------------------------------------------------- YAML
class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping; ``lines`` are both, 1-based."""

    def __init__(self, key: Any, lines: tuple[int, int], node: yaml.Node) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (lines {lines[0]} and "
                         f"{lines[1]})", node.start_mark)
        self.key, self.lines = key, lines


class SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader with two changes for specs.

    - A key given twice in one mapping, at any depth (inside lists too), raises
      :class:`DuplicateKeyError` instead of the last one silently winning. Keys merged in
      with ``<<: *anchor`` may still be overridden by the mapping's own keys, as YAML says.
    - ``1e-3`` and ``1.0e3`` are numbers, as in YAML 1.2 (YAML 1.1, which PyYAML follows,
      reads a float only with a dot and a signed exponent): specs never convert strings to
      numbers, so these must not load as strings.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._check_unique_keys(node, deep)
        return super().construct_mapping(node, deep=deep)

    def _check_unique_keys(self, node: yaml.MappingNode, deep: bool) -> None:
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # check what it merges too
                merged = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                          else [value_node])
                for mapping in merged:
                    if isinstance(mapping, yaml.MappingNode):
                        self._check_unique_keys(mapping, deep)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(key, (first, line), key_node)
            lines[key] = line


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: Path) -> Any:
    """A YAML file read with :class:`SpecLoader`; its problems as :class:`SpecError`."""
    try:
        return yaml.load(path.read_text(), Loader=SpecLoader)  # a SafeLoader: no objects
    except DuplicateKeyError as exc:
        first, second = exc.lines
        raise SpecError(
            f"{path}: key {exc.key!r} is given twice in one mapping (lines {first} and "
            f"{second}); YAML would silently keep only the second. Keep one of them.") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from None


# --------------------------------------------------------------------------- validation
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}
_NUMBER = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$")


def _is_coercion(error: dict[str, Any]) -> bool:
    """Whether a strict-mode error is a conversion lax mode would have made silently: a
    string read as a number or boolean, a boolean as a number, a number as a boolean, a
    float as an integer. (Other numeric types, e.g. numpy's, are left to lax mode.)"""
    kind, value = error["type"], error.get("input")
    if kind not in _EXPECTED:
        return False
    if isinstance(value, (str, bytes)):
        return True
    if kind == "bool_type":
        return isinstance(value, (int, float))
    return isinstance(value, bool) or (kind == "int_type" and isinstance(value, float))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (str, bytes)):
        return f"the string {value!r}"
    return f"the {type(value).__name__} {value!r}"


def _coercion_message(error: dict[str, Any]) -> str:
    kind, value = error["type"], error["input"]
    if kind == "bool_type":
        hint = "write true or false, without quotes"
    elif isinstance(value, bool):
        hint = "write a number, not true or false"
    elif isinstance(value, float):
        hint = "write a whole number, without a decimal point"
    elif isinstance(value, str) and _NUMBER.match(value.strip()):
        hint = f"write {value.strip()} without quotes"
    else:
        hint = f"write {_EXPECTED[kind]}"
    return (f"expected {_EXPECTED[kind]}, found {_show(value)}; {hint} (a spec's numbers "
            "and booleans are never converted from other types)")


def validate_model(model: type[BaseModel], data: Any) -> tuple[BaseModel | None, list[dict]]:
    """``model`` validated from ``data`` with no number or boolean converted: the instance
    (None when there are problems) and the problems, as pydantic's error dicts.

    Pydantic's default (lax) mode turns ``"2"`` and ``true`` into 2 for an int field.
    Its strict mode (``strict=True``) refuses those, but it also refuses what YAML can only
    write as a string or a list: a Path, a tuple, an enum value. So ``data`` is validated
    twice: in lax mode, for the value and every other problem, then in strict mode, of whose
    errors only the conversions lax mode made are kept (:func:`_is_coercion`). Both passes
    run the same validators (``mode="before"`` ones included) and pick union members
    themselves, so nested models, plugin params and ``X | None`` fields need no special
    case, and an int stays accepted for a float field.
    """
    problems: list[dict] = []
    value = None
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors()
    try:
        model.model_validate(data, strict=True)
    except ValidationError as exc:
        coerced = [{**e, "type": "coerced", "msg": _coercion_message(e)}
                   for e in exc.errors() if _is_coercion(e)]
        if coerced:
            locs = {tuple(e["loc"]) for e in coerced}
            problems = [e for e in problems if tuple(e["loc"]) not in locs] + coerced
    return (None if problems else value), problems


_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
           "finite_number", "too_short", "too_long"}


def _message(error: dict[str, Any]) -> str:
    """Pydantic's message, without its "Value error, " prefix; a violated bound also says
    what was found."""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in _BOUNDS:
        message += f" (found {error['input']!r})"
    return message


def format_errors(errors: list[dict], source: str = "spec") -> str:
    """One line per problem: ``path.to.field: message``."""
    lines = []
    for err in errors:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        message = _message(err)
        if err["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        lines.append(f"  {path or '<root>'}: {message}")
    return f"invalid {source}:\n" + "\n".join(lines)


def format_validation_error(exc: ValidationError, source: str = "spec") -> str:
    """One line per problem: ``path.to.field: message``."""
    return format_errors(exc.errors(), source)


def _seed_message(value: int) -> str:
    return (f"seed {value} is outside [0, {SEED_MAX}], the seeds numpy takes; use a "
            "non-negative integer below 2**32")


def _seed_problems(params: BaseModel, loc: tuple[str, ...] = ()) -> list[str]:
    """Fields named ``seed`` (at any depth) outside [0, SEED_MAX]: a component's seed feeds
    numpy or torch generators, which would refuse it only when the run gets there."""
    problems = []
    for field, value in params:
        if isinstance(value, BaseModel):
            problems += _seed_problems(value, (*loc, field))
        elif (field == "seed" and isinstance(value, int) and not isinstance(value, bool)
              and not 0 <= value <= SEED_MAX):
            problems.append(f"params.{'.'.join((*loc, field))}: {_seed_message(value)}")
    return problems


def _param_problems(model: type[BaseModel], errors: list[dict], prefix: str = "") -> list[str]:
    """``prefix.path: message`` of each problem of a params model, listing the known
    parameters after a misspelt one."""
    problems = []
    for err in errors:
        path = (prefix + ".".join(str(p) for p in err["loc"])).rstrip(".")
        message = ("unknown parameter (check its spelling; known: "
                   + ", ".join(model.model_fields) + ")"
                   if err["type"] == "extra_forbidden" else _message(err))
        problems.append(f"{path}: {message}" if path else message)
    return problems


def validate_params(kind: str, name: str, params: dict[str, Any]) -> BaseModel:
    """The registered component's params model, filled with defaults; numbers and
    booleans are not converted (:func:`validate_model`) and every ``seed`` param must be
    in [0, SEED_MAX]."""
    record = get_registry().get(kind, name)
    validated, errors = validate_model(record.params_model, params)
    problems = _param_problems(record.params_model, errors, "params.")
    if validated is not None:
        problems += _seed_problems(validated)
    if problems:
        raise SpecError(f"{kind} '{name}': " + "; ".join(problems))
    return validated


class ComponentSpec(BaseModel):
    """``{name: ..., params: {...}}``; params are validated by the plugin's model."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = ""
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    _validated: BaseModel | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _accept_bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _validate_params(self) -> "ComponentSpec":
        try:
            validated = validate_params(self.kind, self.name, self.params)
        except PluginLoadError:
            raise  # the installation is broken, not this field: one error, not one per field
        except (PluginError, SpecError) as exc:
            raise ValueError(str(exc)) from None
        self.params = validated.model_dump(mode="json")
        self._validated = validated
        return self

    @property
    def component(self) -> Any:
        """The registered class (or function) this spec names."""
        return get_registry().get(self.kind, self.name).component

    @property
    def validated(self) -> BaseModel:
        """The params as the component's own model, validated once with the spec."""
        return self._validated

    def build(self, **runtime: Any) -> Any:
        """``component(params, **runtime)``."""
        return self.component(self.validated, **runtime)


class EncoderSpec(ComponentSpec):
    kind: ClassVar[str] = "encoder"


class HeadSpec(ComponentSpec):
    kind: ClassVar[str] = "head"


class LossTermSpec(ComponentSpec):
    kind: ClassVar[str] = "loss"
    weight: float = Field(1.0, ge=0, allow_inf_nan=False,
                          description="weight of this term in the sum")


class UpgraderSpec(ComponentSpec):
    kind: ClassVar[str] = "upgrader"


class SchedulerSpec(ComponentSpec):
    kind: ClassVar[str] = "scheduler"


class DatasetSpec(ComponentSpec):
    kind: ClassVar[str] = "dataset"


class AllocationSpec(ComponentSpec):
    kind: ClassVar[str] = "allocation"


class TrainSpec(Recipe):
    """How an encoder and its head are trained: the shared recipe plus where and how
    often to log."""

    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    amp: bool = Field(False, description="mixed precision on CUDA")
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="mixed-precision type: auto is bfloat16 where the GPU supports it "
        "(no loss scaling needed), else float16 with a gradient scaler")
    log_every: int = Field(20, ge=1, description="steps between JSON-lines log records")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes decoding "
                             "images ahead of the model (0: decode in the training process)")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker prepares ahead")
    persistent_workers: bool = Field(True, description="keep the workers between epochs")
    pin_memory: Literal["auto"] | bool = Field(
        "auto", description="page-locked batches for non-blocking copies (auto: on CUDA)")
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="NHWC memory format for convolutions (auto: on CUDA)")
    compile: bool = Field(False, description="torch.compile the encoder (needs a compiler "
                          "toolchain; first steps are slow while it compiles)")
    sync_batchnorm: bool = Field(False, description="under torchrun, BatchNorm statistics "
                                 "over the whole batch of all GPUs (SyncBatchNorm; GPUs only)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """A device torch can name (whether it is present is the run's business)."""
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError(f"device '{value}' is not a device torch knows; use auto, "
                                 "cpu, cuda, cuda:<index> or mps") from None
        return value


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoder: EncoderSpec
    head: HeadSpec
    train: TrainSpec = Field(default_factory=TrainSpec)


class DirectUpgradeSpec(BaseModel):
    """An extra upgrader into a model, reported beside its chain's: straight from an older
    generation (FCT's h_{1->3} against h3(h2(.), g2(.))), or another upgrader from the
    previous model (e.g. the same h without side information, on the same new model)."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="'old' or an earlier new model whose gallery it maps")
    upgrader: UpgraderSpec
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="label in reports; default direct-from-<source>")

    @property
    def label(self) -> str:
        return self.name or f"direct-from-{self.source}"


class NewModelSpec(ModelSpec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    previous: str = Field(
        "old", description="the model this one follows: its compat losses read that model and "
        "its upgrader maps that model's gallery ('old' or an earlier new model: chains "
        "v1 -> v2 -> v3)")
    stage: int | None = Field(
        None, ge=1, description="which training set of the allocation this model sees (1 = the "
        "second stage; sequential allocations have one stage per version); null = the last")
    direct_upgrades: list[DirectUpgradeSpec] = Field(
        default_factory=list, description="extra upgraders into this model (from an older "
        "generation, skipping the chain, or alternatives from the previous model), reported "
        "beside the chain's")
    losses: list[LossTermSpec] = Field(
        default_factory=lambda: [LossTermSpec(name="classification")], min_length=1)
    upgrader: UpgraderSpec | None = Field(
        None, description="learned map of the stored old gallery into this model's space "
        "(BiCT psi, FCT h); evaluated as n2u and used for the not-yet-backfilled items")
    old_feature_cache: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: use cached (un-augmented) old features when augmentation is "
        "off or a loss needs the cache anyway; always: also as a stand-in for augmented views")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: DatasetSpec
    allocation: AllocationSpec = Field(
        default_factory=lambda: AllocationSpec(name="extended-data"))
    augment: dict[str, Any] = Field(default_factory=dict, description="BatchAugment params")

    @field_validator("augment")
    @classmethod
    def _check_augment(cls, value: dict[str, Any]) -> dict[str, Any]:
        from compatzoo.data.augment import AugmentParams

        validated, errors = validate_model(AugmentParams, value)
        if errors:
            raise ValueError("; ".join(_param_problems(AugmentParams, errors)))
        return validated.model_dump(mode="json")


class BackfillSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: int = Field(21, ge=2, description="evenly spaced backfilled fractions, 0% and "
                        "100% included")
    schedulers: list[SchedulerSpec] = Field(
        default_factory=lambda: [SchedulerSpec(name="random")], min_length=1)
    models: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="new models to curve, each once; null = all")
    nfr_k: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1], min_length=1,
        description="k of each negative flip rate NFR@k, distinct, >= 1")

    @model_validator(mode="after")
    def _distinct_entries(self) -> "BackfillSpec":
        labels = [self.label(s) for s in self.schedulers]
        for field, values in (("schedulers", labels), ("models", self.models or []),
                              ("nfr_k", self.nfr_k)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"backfill.{field} lists {repeated} more than once; list "
                                 "each once")
        return self

    def label(self, scheduler: SchedulerSpec) -> str:
        """The scheduler's name, with its params when the list has it more than once."""
        if [s.name for s in self.schedulers].count(scheduler.name) == 1:
            return scheduler.name
        params = ",".join(f"{k}={v}" for k, v in sorted(scheduler.params.items()))
        return f"{scheduler.name}({params})"


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metrics: list[str] = Field(default_factory=lambda: ["map@100", "cmc@1", "cmc@5"],
                               min_length=1)
    primary: str = "map@100"
    paragon: str | None = Field(
        None, description="new model used as M(new*, new*) in BCT's update gain; null = the "
        "first new model trained with classification only")
    backfill: BackfillSpec | None = Field(default_factory=BackfillSpec)
    batch_size: int = Field(512, ge=1, description="feature extraction batch size")
    queries_without_positive: Literal["skip", "miss"] = Field(
        "skip", description="queries with no positive in the gallery: left out of every "
        "mean (the papers' protocols) or counted as misses, 0 (FastFill's evaluation code)")
    distance: Literal["cosine", "euclidean"] = Field(
        "cosine", description="what ranks a gallery: cosine similarity (the papers, "
        "OpenCompatible) or the L2 distance between raw, unnormalised features (ml-fct's "
        "evaluation of FCT and FastFill)")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        from compatzoo.retrieval import parse_metric
        from compatzoo.retrieval.revisited import REVISITED_METRICS

        seen: dict[tuple[str, int | None], str] = {}
        for name in value:
            if name in REVISITED_METRICS:       # datasets with per-query ground truth
                if value.count(name) > 1:
                    raise ValueError(f"metrics lists '{name}' twice; list each metric once")
                continue
            try:
                metric = parse_metric(name)
            except CompatzooError as exc:
                raise ValueError(str(exc)) from None
            same = seen.setdefault((metric.kind, metric.k), name)
            if same != name or value.count(name) > 1:
                raise ValueError(f"metrics lists one metric twice ('{same}' and '{name}'); "
                                 "list each metric once")
        return value

    @model_validator(mode="after")
    def _primary_listed(self) -> "EvaluationSpec":
        if self.primary not in self.metrics:
            raise ValueError(f"primary metric '{self.primary}' must be one of metrics "
                             f"{self.metrics}")
        return self


REFERENCE_COLUMN = r"^(o2o|n2o|n2u|n2n|auc\..+)$"


class ReferenceSpec(BaseModel):
    """A figure a paper reports for the setting a spec reproduces: the leaderboard shows it
    beside the figure the spec's runs measure in the same row, column and metric. It
    changes nothing a run computes, so a run's fingerprint leaves it out."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the leaderboard row: a new model's name, or "
                       "<model>/<label> of one of its direct upgrades (column n2u)")
    column: str = Field(pattern=REFERENCE_COLUMN, description="o2o, n2o, n2u, n2n, or "
                        "auc.<scheduler> (the mean of that scheduler's backfill curve)")
    metric: str = Field(description="compatzoo's name of the metric (cmc@1, map, rmap-medium, "
                        "...), which the spec must evaluate; a figure compatzoo runs do not "
                        "compute (e.g. tar@far=1e-4) is shown without a measured one")
    value: float = Field(ge=0, le=100, allow_inf_nan=False, description="the paper's "
                         "figure, in %")
    source: str = Field(min_length=1, description="where it is printed, e.g. 'FCT table 1'")
    note: str | None = Field(None, description="how the paper's setting or metric differs")


class ExperimentSpec(BaseModel):
    """A whole upgrade: data + allocation, old model, new model(s), evaluation."""

    model_config = ConfigDict(extra="forbid")
    name: str
    seed: int = Field(
        0, description="in [0, 2**32 - 1]: seeds the allocation, the backfill orders, the old "
        "model (seed) and new model i (seed + 1 + i)")
    data: DataSpec
    old: ModelSpec
    new: list[NewModelSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    references: list[ReferenceSpec] = Field(
        default_factory=list, description="the papers' figures for this setting, shown "
        "beside the measured ones in the leaderboard")

    @model_serializer(mode="wrap")
    def _without_empty_references(self, handler: Any) -> Any:
        """A spec without references dumps as it did before the field existed: results,
        bundles and run manifests record the dump, and runs are matched by its hash."""
        data = handler(self)
        if not self.references and isinstance(data, dict):
            data.pop("references", None)
        return data

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int) -> int:
        if not 0 <= value <= SEED_MAX:
            raise ValueError(_seed_message(value))
        return value

    @model_validator(mode="before")
    @classmethod
    def _apply_new_defaults(cls, data: Any) -> Any:
        """``new_defaults`` fills encoder/head/train (or any other field but the name) of
        every new model that omits them."""
        if isinstance(data, dict) and "new_defaults" in data:
            data = dict(data)
            defaults = data.pop("new_defaults") or {}
            if not isinstance(defaults, dict):
                raise ValueError("new_defaults must be a mapping of encoder/head/train")
            allowed = [field for field in NewModelSpec.model_fields if field != "name"]
            unknown = sorted(map(str, set(defaults) - set(allowed)))
            if unknown:  # one error here rather than one under every new model
                raise ValueError(f"new_defaults sets {unknown}, which is not a field a new "
                                 f"model shares (check the spelling); it may set {allowed}")
            data["new"] = [{**defaults, **entry} if isinstance(entry, dict) else entry
                           for entry in data.get("new", [])]
        return data

    @model_validator(mode="after")
    def _check_models(self) -> "ExperimentSpec":
        last_seed = self.seed + len(self.new)
        if last_seed > SEED_MAX:
            raise ValueError(f"seed {self.seed} is too large: new model i trains with seed + 1 "
                             f"+ i, up to {last_seed}, past {SEED_MAX} (numpy's largest); use "
                             f"a seed of at most {SEED_MAX - len(self.new)}")
        names = [m.name for m in self.new]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"new model names must be unique; repeated: {duplicates}")
        for i, model in enumerate(self.new):
            earlier = ["old", *names[:i]]
            sources = [("previous", model.previous)] + [
                (f"direct_upgrades[{k}].source", d.source)
                for k, d in enumerate(model.direct_upgrades)]
            for field, source in sources:
                if source not in earlier:
                    raise ValueError(
                        f"new model '{model.name}': {field} '{source}' must be 'old' or a new "
                        f"model listed before it ({earlier}); list models oldest first")
            labels = [d.label for d in model.direct_upgrades]
            if len(set(labels)) < len(labels):
                raise ValueError(
                    f"new model '{model.name}': direct_upgrades labels {labels} repeat; give "
                    "each entry from the same source its own name")
        paragon = self.evaluation.paragon
        if paragon is not None and paragon not in names:
            raise ValueError(f"evaluation.paragon '{paragon}' is not a new model; new models "
                             f"are {names}")
        backfill = self.evaluation.backfill
        if backfill and backfill.models:
            unknown = sorted(set(backfill.models) - set(names))
            if unknown:
                raise ValueError(f"evaluation.backfill.models names {unknown}, which are not "
                                 f"new models; new models are {names}")
        return self

    @model_validator(mode="after")
    def _check_references(self) -> "ExperimentSpec":
        """Every reference names a row and column the leaderboard has, and a metric the
        spec evaluates (unless compatzoo runs do not compute it), so a typo is an error
        here rather than a paper figure with nothing beside it."""
        from compatzoo.retrieval import parse_metric
        from compatzoo.retrieval.revisited import REVISITED_METRICS

        models = {m.name: m for m in self.new}
        upgrades = {f"{m.name}/{d.label}" for m in self.new for d in m.direct_upgrades}
        backfill = self.evaluation.backfill
        for i, ref in enumerate(self.references):
            where = f"references[{i}] ({ref.model} {ref.column} {ref.metric})"
            if ref.model in upgrades:
                if ref.column != "n2u":
                    raise ValueError(f"{where}: the row of a direct upgrade has only the "
                                     "column n2u")
            elif ref.model not in models:
                raise ValueError(f"{where}: model must be a new model {sorted(models)} or "
                                 f"<model>/<label> of a direct upgrade {sorted(upgrades)}")
            elif ref.column == "n2u" and models[ref.model].upgrader is None:
                raise ValueError(f"{where}: n2u needs an upgrader, and '{ref.model}' has none")
            elif ref.column.startswith("auc."):
                scheduler = ref.column.removeprefix("auc.")
                labels = [backfill.label(s) for s in backfill.schedulers] if backfill else []
                curved = backfill is not None and ref.model in (backfill.models or models)
                if not curved or scheduler not in labels:
                    raise ValueError(f"{where}: no backfill curve of '{ref.model}' with the "
                                     f"scheduler '{scheduler}' (schedulers: {labels})")
            if ref.metric in self.evaluation.metrics:
                continue
            try:
                if ref.metric not in REVISITED_METRICS:
                    parse_metric(ref.metric)
            except CompatzooError:
                continue                   # a figure compatzoo runs do not compute
            raise ValueError(f"{where}: the spec does not evaluate {ref.metric}; add it to "
                             f"evaluation.metrics {self.evaluation.metrics} or spell it as "
                             "listed there")
        return self


def load_spec(source: str | Path | dict[str, Any]) -> ExperimentSpec:
    """Read and validate an experiment spec from YAML (path) or a dict.

    YAML is read with :class:`SpecLoader` (a key given twice is an error) and the spec is
    validated with :func:`validate_model` (no number or boolean converted)."""
    label = "spec"
    if not isinstance(source, dict):
        path = Path(source)
        label = f"spec {path}"
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        source = read_yaml(path)
        if not isinstance(source, dict):
            raise SpecError(f"{path} must contain a YAML mapping at the top level")
    spec, problems = validate_model(ExperimentSpec, source)
    if problems:
        raise SpecError(format_errors(problems, label))
    return spec
