"""Where a model or dataset comes from: a local folder or a Hub id, and a one-line error naming it when neither
exists (a typo in a path is never blamed on the Hub)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants

from hlss_hf.errors import SourceError


def looks_local(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a local path rather than a Hub repo id: the one rule ``train.py`` and
    ``python -m hlss_hf.evaluate`` use before asking the Hub.

    A Hub id is ``name`` or ``namespace/name``. `spec` is local when it exists; when it starts with ``.``, ``/``
    or ``~`` (or holds the OS's other separator, ``\\`` on Windows); when it has more than one ``/``; or when
    its first component is an existing folder here (``data/dmo`` while ``data/`` exists).
    """
    text = os.fspath(spec)
    if os.path.exists(os.path.expanduser(text)) or text.startswith((".", "/", "~", os.sep)):
        return True
    if os.altsep and os.altsep != "/" and os.altsep in text:
        return True
    if os.sep != "/" and os.sep in text:
        return True
    return text.count("/") > 1 or ("/" in text and os.path.isdir(text.split("/", 1)[0]))


def check_local_source(spec: str | os.PathLike, kind: str, key: str | None = None) -> None:
    """Raise :class:`SourceError` when `spec` looks local (:func:`looks_local`) but does not exist, so that a typo
    in a path is reported at once instead of being looked up on the Hub. ``kind`` (``"model"`` or ``"dataset"``)
    and ``key`` (the option or config key that gave it, e.g. ``"data.dataset"``) are named in the message.
    """
    path = Path(os.path.expanduser(os.fspath(spec)))
    if looks_local(spec) and not path.exists():
        parent = next((p for p in path.absolute().parents if p.is_dir()), None)
        raise SourceError(f"{_named(spec, kind, key)}: no such folder (nearest existing: {parent})")


def _named(spec: str | os.PathLike, kind: str, key: str | None) -> str:
    return f"{kind} {os.fspath(spec)!r}" + (f" ({key})" if key else "")


def hub_source_error(
    spec: str | os.PathLike, kind: str, error: BaseException, key: str | None = None
) -> SourceError | None:
    """The :class:`SourceError` for a failed Hub load of `spec` that is not a local folder, or ``None`` when the
    error is of another kind (a broken file, a bug) and should propagate as it is.

    Offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) with an id that is not cached, and a repo that does
    not exist (or is private) on the Hub are named as such; other Hub or connection errors keep their first line.
    ``kind`` and ``key`` as in :func:`check_local_source` (``kind`` is also the Hub repo type).
    """
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    text = os.fspath(spec)
    if os.path.isdir(os.path.expanduser(text)):
        return None
    named = _named(spec, kind, key)
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    words = " ".join(str(e) for e in chain).lower()
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    if offline and (
        any(isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError)) for e in chain)
        or "offline" in words
        or "cached files" in words
    ):
        return SourceError(
            f"{named} is not a local folder and not in the Hub cache, and offline mode is on "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): unset it to download, or give a local folder"
        )
    if (
        any(isinstance(e, RepositoryNotFoundError) for e in chain)
        or "DatasetNotFoundError" in names
        or "not a valid model identifier" in words
        or "doesn't exist on the hub" in words
    ):
        return SourceError(
            f"{named} is not a local folder, and the Hub ({constants.ENDPOINT}) has no {kind} repo of "
            "that name you can read (a typo? a private repo needs `hf auth login`)"
        )
    if any(isinstance(e, (HfHubHTTPError, ConnectionError, OfflineModeIsEnabled)) for e in chain):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # Said as a missing folder first: a relative path like data/demo reads as a Hub id when data/ is absent.
        return SourceError(
            f"{named}: no such folder here ({Path.cwd()}), and the Hub could not be reached to look it up as a "
            f"{kind} repo ({first})"
        )
    return None


def hub_url(repo_id: str, repo_type: str = "model") -> str:
    """The web address of a Hub repo on the endpoint in use (``HF_ENDPOINT``, default huggingface.co)."""
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{constants.ENDPOINT.rstrip('/')}/{prefix}{repo_id}"
