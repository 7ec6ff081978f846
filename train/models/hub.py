"""Models by name: a Hugging Face hub id (`org/name`, or `org/name@revision`) resolved from the local cache.

Compute nodes usually have no internet, so nothing is downloaded: the id must already be in the
cache that `HF_HOME` / `HF_HUB_CACHE` point to (filled beforehand with `hf download org/name`
on a machine that has internet). A local path always wins over an id of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path

from train.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?:@[\w./-]+)?$")


def is_hub_id(ref: str) -> bool:
    """True for `org/name[@revision]` that is not an existing local path."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).exists()


def resolve_model_ref(ref: str, key: str) -> str:
    """A local directory for `ref`: itself if it is a path, else the cached snapshot of the hub id.
    A hub id missing from the cache is a ConfigError naming the id and the cache directory."""
    if not ref or not is_hub_id(ref):
        return ref
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = ref.partition("@")
    try:
        # cache_dir read now, not at import: HF_HUB_CACHE / HF_HOME set after import still count
        return snapshot_download(repo_id, revision=revision or None, local_files_only=True,
                                 cache_dir=constants.HF_HUB_CACHE)
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"{key}: {ref} is not a local directory, and the Hugging Face cache {constants.HF_HUB_CACHE} has no "
            f"snapshot of it{' at revision ' + revision if revision else ''}. Nothing is downloaded here: run "
            f"`hf download {repo_id}{' --revision ' + revision if revision else ''}` on a machine with internet, "
            "into the cache this job reads "
            "(HF_HOME or HF_HUB_CACHE)") from None
