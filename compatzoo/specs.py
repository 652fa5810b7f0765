"""Pydantic specs for components and whole upgrade experiments.

A component is named by ``name`` and carries ``params``; validation looks the name up in
the registry and validates the params with the plugin's own model, so a typo anywhere in
a spec is reported with its full path before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)

from compatzoo.engine.fitting import Recipe
from compatzoo.errors import CompatzooError, PluginError, SpecError
from compatzoo.registry import get_registry


def format_validation_error(exc: ValidationError, source: str = "spec") -> str:
    """One line per problem: ``path.to.field: message``."""
    lines = []
    for err in exc.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        lines.append(f"  {path or '<root>'}: {message}")
    return f"invalid {source}:\n" + "\n".join(lines)


def validate_params(kind: str, name: str, params: dict[str, Any]) -> BaseModel:
    """The registered component's params model, filled with defaults."""
    record = get_registry().get(kind, name)
    try:
        return record.params_model.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"params.{'.'.join(str(p) for p in e['loc'])}: "
            + ("unknown parameter (check its spelling; known: "
               + ", ".join(record.params_model.model_fields) + ")"
               if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors())
        raise SpecError(f"{kind} '{name}': {problems}") from None


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
    weight: float = Field(1.0, ge=0, description="weight of this term in the sum")


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
    log_every: int = Field(20, ge=1, description="steps between JSON-lines log records")


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

        return AugmentParams.model_validate(value).model_dump(mode="json")


class BackfillSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: int = Field(21, ge=2)
    schedulers: list[SchedulerSpec] = Field(
        default_factory=lambda: [SchedulerSpec(name="random")], min_length=1)
    models: list[str] | None = Field(None, description="new models to curve; null = all")
    nfr_k: list[int] = Field(default_factory=lambda: [1])

    @model_validator(mode="after")
    def _distinct_schedulers(self) -> "BackfillSpec":
        labels = [self.label(s) for s in self.schedulers]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"backfill.schedulers lists {repeated} more than once")
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

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        from compatzoo.retrieval import parse_metric

        for name in value:
            try:
                parse_metric(name)
            except CompatzooError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _primary_listed(self) -> "EvaluationSpec":
        if self.primary not in self.metrics:
            raise ValueError(f"primary metric '{self.primary}' must be one of metrics "
                             f"{self.metrics}")
        return self


class ExperimentSpec(BaseModel):
    """A whole upgrade: data + allocation, old model, new model(s), evaluation."""

    model_config = ConfigDict(extra="forbid")
    name: str
    seed: int = 0
    data: DataSpec
    old: ModelSpec
    new: list[NewModelSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="before")
    @classmethod
    def _apply_new_defaults(cls, data: Any) -> Any:
        """``new_defaults`` fills encoder/head/train of every new model that omits them."""
        if isinstance(data, dict) and "new_defaults" in data:
            data = dict(data)
            defaults = data.pop("new_defaults") or {}
            if not isinstance(defaults, dict):
                raise ValueError("new_defaults must be a mapping of encoder/head/train")
            data["new"] = [{**defaults, **entry} if isinstance(entry, dict) else entry
                           for entry in data.get("new", [])]
        return data

    @model_validator(mode="after")
    def _check_models(self) -> "ExperimentSpec":
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


def load_spec(source: str | Path | dict[str, Any]) -> ExperimentSpec:
    """Read and validate an experiment spec from YAML (path) or a dict."""
    label = "spec"
    if not isinstance(source, dict):
        path = Path(source)
        label = f"spec {path}"
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        try:
            source = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SpecError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(source, dict):
            raise SpecError(f"{path} must contain a YAML mapping at the top level")
    try:
        return ExperimentSpec.model_validate(source)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, label)) from None
