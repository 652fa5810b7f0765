"""Publishing a bundle to the Hugging Face Hub through huggingface_hub's ``HfApi``."""

from __future__ import annotations

from pathlib import Path

from compatzoo.bundles.bundle import open_bundle
from compatzoo.bundles.sources import BUNDLE_TEXT_FILES, parse_hub


def publish(folder: str | Path, repo: str, *, revision: str | None = None,
            private: bool = False, commit_message: str | None = None, token=None):
    """Upload a bundle folder to ``repo`` (``ORG/NAME``), creating the repo (and the
    branch ``revision``) when needed; returns huggingface_hub's ``CommitInfo``.

    The folder is loaded first -- hashes, shapes, the modules it builds -- so a bundle
    that would not load is never published; only the bundle's own files are uploaded.
    """
    from huggingface_hub import HfApi

    bundle = open_bundle(folder)
    repo_id, _ = parse_hub(repo)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(bundle.folder), revision=revision,
        allow_patterns=[*BUNDLE_TEXT_FILES, *bundle.config.files],
        commit_message=commit_message or f"compatzoo bundle {bundle.config.name} "
        f"({bundle.config.old.generation} -> {bundle.config.new.generation})")
