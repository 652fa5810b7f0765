"""Bundles and the Hugging Face Hub, offline: ``hf-hub:`` sources go through
huggingface_hub's real download code against a cache this test writes in the library's
layout (refs, snapshots, blobs), and publishing is checked at the ``HfApi`` boundary."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import CommitInfo, HfApi, constants

from compatzoo.bundles import BundleNotFoundError, load
from compatzoo.bundles.hub import publish
from compatzoo.errors import CheckpointError

REPO = "compatzoo-test/tiny-bict"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_the_suite_runs_offline():
    assert constants.HF_HUB_OFFLINE                               # set before the import


@pytest.fixture(scope="module")
def bundle_folder(tmp_path_factory) -> Path:
    from test_end_to_end import OLD_ENCODER, tiny_spec
    from test_sequential import PSI

    from compatzoo.experiment import run_experiment
    from compatzoo.specs import load_spec

    spec = tiny_spec(OLD_ENCODER)
    spec["new"] = [{"name": "psi", "losses": ["classification", "cosine"],
                    "upgrader": {"name": "bict-mlp", "params": PSI}}]
    out = tmp_path_factory.mktemp("run")
    run_experiment(load_spec(spec), out, progress=False, save_checkpoints=False)
    return out / "bundles" / "psi"


def populate_cache(cache: Path, repo: str, commit: str, folder: Path,
                   refs: dict[str, str]) -> Path:
    """Put ``folder`` in the cache as huggingface_hub lays it out: file contents in
    ``blobs/<hash>``, ``snapshots/<commit>/<path>`` linking to them, ``refs/<name>``
    holding the commit a branch or tag points to."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relpath = path.relative_to(folder)
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for name, target in refs.items():
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / name).write_text(target)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub uses by default (HF_HUB_CACHE)."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("revision", [None, "v1", COMMIT])
def test_a_cached_hub_bundle_loads_by_branch_tag_or_commit(bundle_folder, cache, revision):
    populate_cache(cache, REPO, COMMIT, bundle_folder, {"main": COMMIT, "v1": COMMIT})
    source = f"hf-hub:{REPO}" + (f"@{revision}" if revision else "")
    bundle = load(source)
    assert bundle.source["kind"] == "hf-hub" and bundle.source["commit"] == COMMIT
    assert bundle.source["repo"] == REPO and bundle.source["revision"] == revision
    local = load(bundle_folder)
    images = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    import torch

    assert np.array_equal(bundle.encode(torch.from_numpy(images)),
                          local.encode(torch.from_numpy(images)))


def test_only_the_bundles_files_are_read_from_the_snapshot(bundle_folder, cache):
    snapshot = populate_cache(cache, REPO, COMMIT, bundle_folder, {"main": COMMIT})
    (snapshot / "README.md").unlink()                     # a card is not needed to load
    stray = snapshot / "notes" / "huge.bin"
    stray.parent.mkdir()
    stray.write_bytes(b"\0" * 10)
    assert load(f"hf-hub:{REPO}").config.name == "psi"


def test_a_hub_bundle_missing_from_the_cache_names_the_cache_and_the_download_command(cache):
    with pytest.raises(BundleNotFoundError) as info:
        load(f"hf-hub:{REPO}@v2")
    message = str(info.value)
    assert str(cache) in message and "HF_HUB_OFFLINE is set" in message
    assert f"hf download {REPO} --revision v2" in message


def test_a_revision_the_repo_lacks_is_named(monkeypatch, cache):
    """What the Hub answers for an unknown revision (when it is reachable)."""
    from unittest.mock import Mock

    from huggingface_hub.errors import RevisionNotFoundError

    def unknown_revision(*args, **kwargs):
        raise RevisionNotFoundError("404 Revision Not Found", response=Mock(status_code=404))

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unknown_revision)
    with pytest.raises(BundleNotFoundError, match=r"has no revision 'nope'; give a branch, tag"):
        load(f"hf-hub:{REPO}@nope")


@pytest.mark.parametrize("bad", ["hf-hub:onlyname", "hf-hub:a/b/c", "hf-hub:/x"])
def test_a_malformed_hub_reference_says_the_form(bad):
    with pytest.raises(BundleNotFoundError, match="expected hf-hub:ORG/NAME"):
        load(bad)


def test_a_corrupt_cached_file_fails_its_hash(bundle_folder, cache):
    snapshot = populate_cache(cache, REPO, COMMIT, bundle_folder, {"main": COMMIT})
    blob = (snapshot / "upgrader" / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="has sha256 .* corrupt or was replaced"):
        load(f"hf-hub:{REPO}")


# --------------------------------------------------------------------------- publishing
class RecordingApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **_):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
                          commit_message=kwargs["commit_message"], commit_description="",
                          oid="abc" * 13 + "a")


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    return RecordingApi


def test_publish_creates_the_repo_and_uploads_exactly_the_bundle(bundle_folder, api, capsys):
    from compatzoo.cli import main

    assert main(["publish", str(bundle_folder), "--repo", "someone/tiny-bict", "--revision",
                 "v1", "--private", "--commit-message", "first"]) == 0
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in api.calls)
    assert create == {"repo_id": "someone/tiny-bict", "private": True, "exist_ok": True}
    assert branch == {"repo_id": "someone/tiny-bict", "branch": "v1", "exist_ok": True}
    assert upload["repo_id"] == "someone/tiny-bict" and upload["revision"] == "v1"
    assert Path(upload["folder_path"]) == bundle_folder and upload["commit_message"] == "first"
    files = sorted(str(p.relative_to(bundle_folder)) for p in bundle_folder.rglob("*")
                   if p.is_file())
    assert sorted(upload["allow_patterns"]) == files             # config, card and weights
    assert "https://huggingface.co/someone/tiny-bict/commit/abc" in capsys.readouterr().out
    assert issubclass(RecordingApi, object) and HfApi is not RecordingApi   # only patched here


def test_a_folder_that_does_not_load_is_never_published(bundle_folder, api, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle_folder, broken)
    (broken / "new" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(CheckpointError):
        publish(broken, "someone/tiny-bict")
    assert api.calls == []
