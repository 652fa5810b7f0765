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
    """Call ``register(kind, name, factory, params_model)`` once per component.

    ``kind`` is one of ``encoder, head, loss, upgrader, scheduler, dataset, allocation``;
    ``params_model`` is a pydantic model of the component's user-facing parameters
    (``extra="forbid"``); ``factory(params, **runtime)`` builds the component.
    """
