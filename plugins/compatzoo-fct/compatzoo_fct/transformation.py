"""FCT's transformation h(phi_old(x), psi(x)) -> phi_new(x) and, for chains of updates,
the side transformation g(phi_i(x), psi_i(x)) -> psi_{i+1}(x) (Ramanujan et al. 2022,
secs. 3.3 and 4.4, fig. 4; layer sizes and recipe from the ml-fct reference code).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compatzoo.plugin import (GalleryUpgrader, HopData, InvalidFeaturesError, Recipe, SpecError,
                              StoredGallery, check_features, fit_minibatches)

from compatzoo_fct.side_info import (SIDE_INFORMATION, LearnedSide, SideInfoName,
                                     SideInformation, SideModelParams)

MappingLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(item indices, generator) -> (phi_source, stored side or None, target)`` of one step
MappingInputs = Callable[[torch.Tensor, torch.Generator],
                         tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
SIDE_SEED_OFFSET = 1  # side models train with another seed than the old model


class FCTParams(Recipe):
    """h's architecture, its side information and its recipe (ml-fct
    configs/*_transformation.yaml: Adam 5e-4, wd 2^-15, cosine with 5 warm-up epochs,
    80 epochs, batch 1024, eval mode for the second half)."""

    side_info: SideInfoName = Field(
        "simclr", description="side-information model, trained on old_train only (FCT table 6): "
        "simclr, alt-old, alt-old-mixup, autoencoder, none (zero vector), old-embedding "
        "(phi_old again, the reference code's no-side-model behaviour)")
    side_info_dim: int = Field(128, ge=1, description="width of psi(x) (FCT: SimCLR-128; ml-fct "
                               "side_info_dim 128); for none, the width of the zero vector")
    inner_dim: int = Field(2048, ge=1, description="width of the mixer's hidden layers (ml-fct)")
    side_model: SideModelParams = Field(default_factory=SideModelParams,
                                        description="side encoder and its training")
    epochs: int = Field(80, ge=1, description="ml-fct: 80")
    batch_size: int = Field(1024, ge=2, description="ml-fct: 1024")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="ml-fct: adam")
    lr: float = Field(5e-4, gt=0, description="ml-fct: 5e-4")
    weight_decay: float = Field(3.0517578125e-05, ge=0, description="ml-fct: 2^-15")
    warmup_epochs: float = Field(5.0, ge=0, description="ml-fct: 5")
    freeze_bn_from: float | None = Field(0.5, ge=0, le=1, description="ml-fct "
                                         "switch_mode_to_eval: eval mode from half the epochs on")
    features: Literal["auto", "augmented", "fixed"] = Field(
        "auto", description="augmented: phi_old, phi_new and psi recomputed by the frozen models "
        "from one augmented view of each image at every step, as ml-fct's trainer does; fixed: "
        "computed once from the un-augmented images (faster, less regularised); auto: augmented "
        "when the hop has the images, the encoders and a non-identity augmentation")
    transform_side: bool = Field(
        False, description="also learn g (sec. 4.4): the next version's side model psi_(i+1) "
        "on this version's training set and g(phi_i, psi_i) -> psi_(i+1), so the side "
        "information moves on with the embeddings; needed when a later upgrader of the chain "
        "reads side information")


def _block(cin: int, cout: int) -> nn.Sequential:
    """Linear + BN + ReLU: the reference's 1x1 ConvBlock on a vector."""
    return nn.Sequential(nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout),
                         nn.ReLU(inplace=True))


class FCTNet(nn.Module):
    """Two projection branches and a mixer (FCT fig. 4):
    old ``d_old -> 2 d_old -> 2 d_new``, side ``d_side -> 2 d_side -> 2 d_new``,
    mixer ``4 d_new -> inner -> inner -> d_new + extra_outputs`` (last layer plain)."""

    def __init__(self, old_dim: int, side_dim: int, new_dim: int, inner_dim: int,
                 extra_outputs: int = 0):
        super().__init__()
        self.old_branch = nn.Sequential(_block(old_dim, 2 * old_dim),
                                        _block(2 * old_dim, 2 * new_dim))
        self.side_branch = nn.Sequential(_block(side_dim, 2 * side_dim),
                                         _block(2 * side_dim, 2 * new_dim))
        self.mixer = nn.Sequential(_block(4 * new_dim, inner_dim), _block(inner_dim, inner_dim),
                                   nn.Linear(inner_dim, new_dim + extra_outputs))

    def forward(self, old: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.mixer(torch.cat([self.old_branch(old), self.side_branch(side)], dim=1))


def make_side_model(params: FCTParams, old_dim: int) -> SideInformation:
    return SIDE_INFORMATION[params.side_info](params.side_model, params.side_info_dim, old_dim)


def _fit_side(side_model: SideInformation, images: Any, data: HopData,
              prefix: str) -> list[dict[str, float]]:
    """Train a side model on ``images``; its per-epoch logs are prefixed ``prefix/``."""
    logs = side_model.fit(images, data.augment, data.device, data.seed + SIDE_SEED_OFFSET,
                          data.progress)
    return [{f"{prefix}/{key}": value for key, value in log.items()} for log in logs]


class FCTTransformation(GalleryUpgrader):
    """h: old embedding + stored side information -> new embedding, trained with MSE on
    the new training set (FCT sec. 3.3). ``fit`` first trains the side model on
    ``old_train`` unless it is trained already (loaded, or adopted from a chain).

    The stored side width comes from the params (``side_info_dim``; 0 for ``none`` and
    ``old-embedding``); a conflicting ``side_dim`` passed by the caller is an error.
    """

    Params = FCTParams
    extra_outputs: ClassVar[int] = 0

    def __init__(self, params: FCTParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__()
        self.params = params or type(self).Params()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.side_model = make_side_model(self.params, input_dim)
        self.side_dim = self.side_model.stored_dim
        self.net = FCTNet(input_dim, self.side_model.input_dim, output_dim,
                          self.params.inner_dim, self.extra_outputs)
        self.side_transformation = (
            FCTSideTransformation(self.params.model_copy(update={"transform_side": False}),
                                  input_dim)
            if self.params.transform_side else None)

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(old, self.side_model.branch_input(old, side))

    def side_information(self, images: Any, batch_size: int = 512,
                         progress: bool = True) -> torch.Tensor | None:
        if not bool(self.side_model.fitted):
            raise SpecError("the side-information model is not trained yet; call fit() (or "
                            "adopt_side_model()) before extracting side information")
        return self.side_model.extract(images, batch_size, progress)

    def side_encoder(self) -> nn.Module | None:
        """psi's encoder, for side information learned by a model (None otherwise)."""
        return self.side_model.encoder if isinstance(self.side_model, LearnedSide) else None

    def adopt_side_model(self, side_model: SideInformation) -> None:
        """Use a trained side model, e.g. ``g.next_side_model`` of the previous hop of a
        chain, so that h_{i+1} reads the psi_i the gallery's side information came from."""
        self._check_adoptable(side_model)
        if not bool(side_model.fitted):
            raise SpecError("the side model to adopt is not trained yet")
        self.side_model = side_model

    def _check_adoptable(self, side_model: SideInformation) -> None:
        mine = self.side_model
        if type(side_model) is not type(mine) or side_model.input_dim != mine.input_dim:
            raise SpecError(f"cannot adopt a {type(side_model).__name__} of width "
                            f"{side_model.input_dim}: this upgrader was built for a "
                            f"{type(mine).__name__} of width {mine.input_dim}")

    def carried_side_model(self) -> SideInformation | None:
        """psi_(i+1), whose output g's side information stands for (with transform_side)."""
        g = self.side_transformation
        return None if g is None else g.next_side_model

    def _side_model_to_adopt(self, previous: GalleryUpgrader | None) -> SideInformation | None:
        """The side model the previous hop carried on, when this h learns side info."""
        carried = None if previous is None else previous.carried_side_model()
        if carried is None or not isinstance(self.side_model, LearnedSide):
            return None
        return carried

    def follows(self, previous: GalleryUpgrader) -> None:
        side_model = self._side_model_to_adopt(previous)
        if side_model is not None:
            self._check_adoptable(side_model)

    def advance(self, stored: StoredGallery, chunk_size: int = 65536) -> StoredGallery:
        """h for the embeddings and, with ``transform_side``, g for the side information."""
        features = torch.from_numpy(self.upgrade(stored.features, stored.side, chunk_size))
        side = None
        if self.side_transformation is not None:
            side = torch.from_numpy(
                self.side_transformation.upgrade(stored.features, stored.side, chunk_size))
        return StoredGallery(features, side, stored.features)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        """Side model on old_train (if not trained yet), then h on new_train, then g.

        In a chain, psi_i is the side model the previous hop's g was trained to produce,
        so the side information the chain carries is the kind h was trained on."""
        data.check(self.input_dim, self.output_dim)
        loss = self.mapping_loss(data)
        if isinstance(self.side_model, LearnedSide) and data.new_train is None:
            raise SpecError(f"side_info '{self.params.side_info}' extracts side information "
                            "from the training images; give HopData.new_train (and old_train), "
                            "or use side_info none or old-embedding")
        adopted = self._side_model_to_adopt(data.previous_upgrader)
        if adopted is not None and not bool(self.side_model.fitted):
            self.adopt_side_model(adopted)
        augmented = self.uses_augmented_features(data)
        logs = self.fit_side_model(data)
        if augmented:
            inputs = augmented_inputs(data, self.side_model, data.target_encoder)
        else:
            side = self.side_model.extract(data.new_train, progress=data.progress)
            inputs = fixed_inputs(data, side, data.new_features)
        logs += self.fit_mapping(data, inputs, loss)
        if self.side_transformation is not None:
            self.side_transformation.adopt_side_model(self.side_model)
            logs += [{f"g/{k}": v for k, v in log.items()}
                     for log in self.side_transformation.fit(data)]
        return logs

    def mapping_loss(self, data: HopData) -> MappingLoss:
        """``(net output, target, labels) -> loss``: the reference's nn.MSELoss, the mean
        over items and dimensions. Built before any training so subclasses can fail early."""
        return lambda output, target, labels: F.mse_loss(output, target)

    def uses_augmented_features(self, data: HopData) -> bool:
        """Whether h trains on features recomputed from augmented views (``features``);
        an explicit ``augmented`` without what it needs fails before any training."""
        missing = [name for name, value in (("new_train", data.new_train),
                                            ("source_encoder", data.source_encoder),
                                            ("target_encoder", data.target_encoder),
                                            ("augment", data.augment)) if value is None]
        mode = self.params.features
        if mode == "augmented" and missing:
            raise SpecError(f"features: augmented recomputes the features from augmented "
                            f"images, but the hop data lacks {', '.join(missing)}; give them "
                            "(a run does) or use features: fixed")
        if mode == "auto":
            return not missing and not getattr(data.augment, "is_identity", False)
        return mode == "augmented"

    def fit_side_model(self, data: HopData) -> list[dict[str, float]]:
        """Train psi on the old training images only (FCT sec. 3.2), unless trained already."""
        if bool(self.side_model.fitted):
            return []
        if data.old_train is None:
            raise SpecError(f"side_info '{self.params.side_info}' trains a side model on the "
                            "old model's training images; give HopData.old_train (and "
                            "new_train), or use side_info none or old-embedding")
        return _fit_side(self.side_model, data.old_train, data, "side")

    def fit_mapping(self, data: HopData, inputs: MappingInputs,
                    loss: MappingLoss) -> list[dict[str, float]]:
        """Regress the net's output on the target over new_train, with the frozen
        (phi_old(x), s(x)) as input; BatchNorm freezes as the recipe says."""
        device = data.device
        self.to(device)
        labels = data.labels.to(device)

        def batch_loss(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            old, stored, target = inputs(index, generator)
            output = self.net(old, self.side_model.branch_input(old, stored))
            return loss(output, target, labels[index.to(device)])

        logs = fit_minibatches(self.net, len(data.old_features), batch_loss, self.params,
                               seed=data.seed, progress=data.progress, desc=type(self).__name__)
        self.eval()
        return logs


def fixed_inputs(data: HopData, side: torch.Tensor | None, target: torch.Tensor) -> MappingInputs:
    """The features computed once from the un-augmented images (``features: fixed``)."""
    device = data.device
    old = data.old_features.to(device, torch.float32)
    target = target.to(device, torch.float32)
    side = None if side is None else side.to(device, torch.float32)
    for name, value in (("target", target), ("side information", side),
                        ("labels", data.labels)):
        if value is not None and len(value) != len(old):
            raise InvalidFeaturesError(f"{len(old)} old training features but {len(value)} "
                                       f"rows of {name}; all must follow new_train's order")

    def inputs(index: torch.Tensor, _: torch.Generator):
        index = index.to(device)
        return old[index], None if side is None else side[index], target[index]

    return inputs


def augmented_inputs(data: HopData, side_model: SideInformation,
                     target_encoder: nn.Module) -> MappingInputs:
    """phi_source, psi and the target recomputed by the frozen models from one augmented
    view of the step's images, the same view for all three (ml-fct's
    TransformationTrainer). The models are put in eval mode: they give inputs, so their
    BatchNorm statistics stay those of the trained models."""
    device = data.device
    side_encoder = side_model.encoder if isinstance(side_model, LearnedSide) else None
    for model in (data.source_encoder, target_encoder, side_encoder):
        if model is not None:
            model.to(device).eval()

    @torch.no_grad()
    def inputs(index: torch.Tensor, generator: torch.Generator):
        images, _ = data.new_train.get_batch(index)
        view = data.augment(images.to(device), generator=generator)
        side = None if side_encoder is None else side_encoder(view).float()
        return (data.source_encoder(view).float(), side, target_encoder(view).float())

    return inputs


class FCTSideTransformation(FCTTransformation):
    """g_{i+1}: (phi_i(x), psi_i(x)) -> psi_{i+1}(x), same architecture and MSE training
    as h (FCT sec. 4.4, fig. 5). Its output width is ``side_info_dim`` (the factory's
    ``output_dim`` is ignored): psi_{i+1}, ``next_side_model``, is of the same kind and
    architecture as psi_i and is trained here on ``new_train``, the v_{i+1} data.

    Chain v1 -> v2 -> v3 (stored: phi_1(G), s_1 = psi_1(G))::

        h2 = fct-transformation(d1 -> d2); h2.fit(ctx12)           # psi_1 on D1, h2 on D2
        g2 = fct-side-transformation(d1); g2.adopt_side_model(h2.side_model); g2.fit(ctx12)
        h3 = fct-transformation(d2 -> d3); h3.adopt_side_model(g2.next_side_model); h3.fit(ctx23)
        gallery_v3 = h3.upgrade(h2.upgrade(phi_1, s_1), g2.upgrade(phi_1, s_1))
    """

    def __init__(self, params: FCTParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        params = params or FCTParams()
        if not issubclass(SIDE_INFORMATION[params.side_info], LearnedSide):
            raise SpecError(f"fct-side-transformation maps learned side information to the next "
                            f"version's; side_info '{params.side_info}' stores none")
        super().__init__(params, input_dim, params.side_info_dim)
        self.next_side_model = make_side_model(params, input_dim)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        """psi_i on old_train (if not adopted), psi_{i+1} on new_train, then g on new_train."""
        check_features(data.old_features, self.input_dim, "old features of the training set")
        loss = self.mapping_loss(data)
        augmented = self.uses_augmented_features(data)
        logs = self.fit_side_model(data)
        logs += _fit_side(self.next_side_model, data.new_train, data, "next_side")
        if augmented:
            inputs = augmented_inputs(data, self.side_model, self.next_side_model.encoder)
        else:
            side = self.side_model.extract(data.new_train, progress=data.progress)
            target = self.next_side_model.extract(data.new_train, progress=data.progress)
            inputs = fixed_inputs(data, side, target)
        return logs + self.fit_mapping(data, inputs, loss)
