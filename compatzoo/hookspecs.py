"""pluggy hook specifications of the ``compatzoo`` project.

A plugin distribution declares an entry point in group ``compatzoo`` pointing at a module
with ``@hookimpl``-decorated functions. The core's own components use the same path.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "compatzoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(register: Callable[..., None]) -> None:
    """Call ``register(kind, name, component)`` once per component.

    ``kind`` is one of ``encoder, head, loss, upgrader, scheduler, dataset, allocation``
    (and ``bundle``: ``register("bundle", name, NamedBundle(source=...))`` gives a trained
    bundle a short name for ``compatzoo.load``).
    ``component`` is a class (or a function) with ``Params``, the pydantic model of its
    user-facing parameters (``extra="forbid"``); ``component(params, **runtime)`` builds
    it. Runtime arguments per kind: head ``embedding_dim, num_classes``; upgrader
    ``input_dim, output_dim``; allocation ``labels, seed``; the others none.
    """
