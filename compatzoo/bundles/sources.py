"""Where a bundle comes from: a short name (a card shipped in ``model_cards/`` or a named
bundle a plugin registers), ``hf-hub:ORG/NAME[@REVISION]``, ``local-dir:PATH`` or a path.
Hub access goes through huggingface_hub only, so its cache, offline mode (``HF_HUB_OFFLINE``),
tokens and ``HF_HOME`` settings apply as everywhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from compatzoo.bundles.format import CARD, CONFIG
from compatzoo.errors import CheckpointError, CompatzooError, PluginError

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
# A Hub repo must hold these besides the weight files its config lists.
BUNDLE_TEXT_FILES = (CONFIG, CARD)


class BundleNotFoundError(CompatzooError):
    """A bundle source that names nothing loadable."""


@dataclass(frozen=True)
class NamedBundle:
    """A short name for a bundle, registered by a plugin as ``register("bundle", name,
    NamedBundle(source=...))``. ``source`` is any source :func:`compatzoo.load` accepts."""

    source: str
    description: str = ""


@dataclass(frozen=True)
class Card:
    """A card in ``model_cards/<name>/``: its text, training spec and where its weights are."""

    name: str
    folder: Path
    hub: str | None          # "ORG/NAME[@REVISION]" when the weights are published
    description: str

    @property
    def has_weights(self) -> bool:
        return (self.folder / CONFIG).is_file()

    @property
    def spec(self) -> Path:
        return self.folder / "spec.yaml"


def model_cards() -> dict[str, Card]:
    """Every card shipped with compatzoo (``model_cards/<name>/README.md``)."""
    root = Path(str(resources.files("compatzoo.model_cards")))
    cards = {}
    for folder in sorted(p for p in root.iterdir() if (p / CARD).is_file()):
        meta = _front_matter(folder / CARD).get("compatzoo", {}) or {}
        cards[folder.name] = Card(folder.name, folder, meta.get("hub"),
                                  meta.get("description", ""))
    return cards


def _front_matter(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def registered_bundles() -> dict[str, NamedBundle]:
    from compatzoo.registry import get_registry

    registry = get_registry()
    return {name: registry.get("bundle", name).component for name in registry.names("bundle")}


def list_bundles() -> list[dict[str, Any]]:
    """Every short name: where it comes from and whether its weights can be had."""
    rows = [{"name": card.name,
             "source": ("model_cards (shipped)" if card.has_weights
                        else f"{HUB_PREFIX}{card.hub}" if card.hub else "model_cards"),
             "weights": ("shipped" if card.has_weights else "on the Hub" if card.hub
                         else "not published"),
             "description": card.description}
            for card in model_cards().values()]
    rows += [{"name": name, "source": named.source, "weights": "via plugin",
              "description": named.description} for name, named in registered_bundles().items()]
    return sorted(rows, key=lambda row: row["name"])


# --------------------------------------------------------------------------- resolving
def resolve(source: str | Path, *, cache_dir: str | Path | None = None,
            _seen: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The local folder of ``source`` (downloaded if it is on the Hub) and a description
    of where it came from."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return hub_snapshot(text[len(HUB_PREFIX):], cache_dir=cache_dir)
    if text.startswith(LOCAL_PREFIX):
        return _local(Path(text[len(LOCAL_PREFIX):]).expanduser(), text)
    path = Path(text).expanduser()
    if isinstance(source, Path) or path.exists() or "/" in text or text.startswith("."):
        return _local(path, text)
    return _named(text, cache_dir=cache_dir, seen=_seen)


def _local(path: Path, uri: str) -> tuple[Path, dict[str, Any]]:
    if not path.is_dir():
        raise BundleNotFoundError(f"bundle folder {path} does not exist; give the folder "
                                  "`compatzoo run` wrote (RUN_DIR/bundles/NAME) or `compatzoo "
                                  "bundle` re-created")
    return path, {"kind": "local-dir", "uri": uri, "path": str(path.resolve())}


def _named(name: str, *, cache_dir, seen: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    cards = model_cards()
    card = cards.get(name)
    if card is not None:
        if card.has_weights:
            return card.folder, {"kind": "model-card", "uri": name, "path": str(card.folder)}
        if card.hub:
            folder, info = hub_snapshot(card.hub, cache_dir=cache_dir)
            return folder, {**info, "name": name}
        raise BundleNotFoundError(
            f"'{name}' is a card in model_cards/ but no one has published its weights yet. "
            f"Train it with\n  compatzoo run {card.spec} -o runs/{name}\nthen publish the "
            f"bundle of its new model with\n  compatzoo publish runs/{name}/bundles/<model> "
            f"--repo ORG/{name}\nand load it as hf-hub:ORG/{name}")
    try:
        registered = registered_bundles()
    except PluginError:
        registered = {}
    if name in registered:
        if name in seen:
            raise BundleNotFoundError(f"named bundles refer to each other in a loop: "
                                      f"{' -> '.join((*seen, name))}")
        folder, info = resolve(registered[name].source, cache_dir=cache_dir,
                               _seen=(*seen, name))
        return folder, {**info, "name": name}
    known = sorted({*cards, *registered})
    raise BundleNotFoundError(f"no bundle named {name!r}; known names: {', '.join(known) or 'none'}"
                              f". Other sources: {HUB_PREFIX}ORG/NAME[@REVISION], "
                              f"{LOCAL_PREFIX}PATH or a folder path")


def parse_hub(reference: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` -> (repo id, revision)."""
    repo, _, revision = reference.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise BundleNotFoundError(f"{HUB_PREFIX}{reference}: expected {HUB_PREFIX}ORG/NAME or "
                                  f"{HUB_PREFIX}ORG/NAME@REVISION (a branch, tag or commit)")
    return repo, revision or None


def hub_snapshot(reference: str, *, cache_dir=None) -> tuple[Path, dict[str, Any]]:
    """Download (or find in the cache) exactly the bundle's files of a Hub repo."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = parse_hub(reference)
    where = f"{HUB_PREFIX}{repo}" + (f"@{revision}" if revision else "")
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        config_path = hf_hub_download(repo, CONFIG, revision=revision, cache_dir=cache_dir)
        try:
            files = json.loads(Path(config_path).read_text()).get("files", {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{where}: {CONFIG} is not a bundle config ({exc})") from None
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=[*BUNDLE_TEXT_FILES, *files])
    except RevisionNotFoundError:
        raise BundleNotFoundError(f"{where}: the repo has no revision {revision!r}; give a "
                                  "branch, tag or commit it has") from None
    except RepositoryNotFoundError:
        raise BundleNotFoundError(f"{where}: no such repo on the Hub (or it is private and "
                                  "no token is set: `hf auth login`)") from None
    except LocalEntryNotFoundError:   # a subclass of EntryNotFoundError: caught first
        offline = constants.HF_HUB_OFFLINE
        raise BundleNotFoundError(
            f"{where} is not in the Hugging Face cache {cache}"
            + (" and HF_HUB_OFFLINE is set, so it cannot be downloaded" if offline
               else " and the Hub cannot be reached")
            + f". Fetch it where the Hub is reachable with\n  hf download {repo}"
            + (f" --revision {revision}" if revision else "")
            + (f" --cache-dir {cache}" if cache_dir else "")
            + "\nor point HF_HOME / HF_HUB_CACHE at a cache that holds it") from None
    except EntryNotFoundError:
        raise BundleNotFoundError(f"{where} has no {CONFIG}: it is not a compatzoo "
                                  "bundle") from None
    folder = Path(folder)
    return folder, {"kind": "hf-hub", "uri": where, "repo": repo, "revision": revision,
                    "commit": folder.name, "path": str(folder)}
