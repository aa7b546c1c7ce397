"""Records, image decoding, the phantom world and the public-data adapters."""

from __future__ import annotations

from typing import Any

from sae_cxr.data.base import Box, DataSet, Record  # noqa: F401


def open_dataset(spec: dict[str, Any]) -> DataSet:
    """Reopen a data set from the spec a run's manifest stored (`DataSet.spec`)."""
    kind = spec.get("kind")
    if kind == "phantom":
        from sae_cxr.data.phantom import PhantomConfig, PhantomWorld

        cfg = PhantomConfig.from_dict({k: v for k, v in spec.items() if k != "kind"})
        return PhantomWorld(cfg).dataset()
    if kind == "folder":
        from sae_cxr.data.folder import load_folder

        return load_folder(spec["csv"], spec.get("image_root"), uncertainty=spec.get("uncertainty", "ignore"),
                           skip_bad=bool(spec.get("skip_bad", False)))
    from sae_cxr.data import public

    return public.open_public(spec)
