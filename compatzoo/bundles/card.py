"""A bundle's model card: a Hugging Face ``README.md`` with ``library_name: compatzoo``
and a ``model-index`` of the run's figures, written with huggingface_hub's card classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from compatzoo.bundles.format import BundleConfig

#: Rows of a run's lifecycle table, as the card names them.
SETTINGS = {"o2o": "old queries, old gallery", "n2o": "new queries, old gallery (no backfill)",
            "n2u": "new queries, upgraded gallery", "n2n": "new queries, re-embedded gallery",
            "a2o": "adapted new queries, old gallery"}


def card_data(config: BundleConfig, meta: dict | None = None):
    from huggingface_hub import EvalResult, ModelCardData

    evaluation = config.evaluation
    dataset = config.spec.get("data", {}).get("dataset", {}).get("name", "unknown")
    results = [EvalResult(task_type="image-feature-extraction", dataset_type=dataset,
                          dataset_name=f"{dataset} ({config.experiment})",
                          metric_type=metric, metric_value=round(100 * value, 2),
                          metric_name=f"{setting} {metric}")
               for setting, values in evaluation.get("settings", {}).items()
               for metric, value in values.items()]
    losses = {term["name"] for term in _new_model(config).get("losses", [])
              if isinstance(term, dict)} - {"classification"}
    methods = sorted(losses | ({config.upgrader.name} if config.upgrader else set()))
    return ModelCardData(library_name="compatzoo", model_name=config.name,
                         tags=["compatzoo", "compatible-representation-learning",
                               "image-retrieval", *methods],
                         datasets=[dataset], eval_results=results or None, license="apache-2.0",
                         **({"compatzoo": meta} if meta else {}))


def _new_model(config: BundleConfig) -> dict:
    return next((m for m in config.spec.get("new", []) if m.get("name") == config.new.generation),
                {})


def _usage(config: BundleConfig, load_as: str) -> str:
    """How to load the bundle and apply it, by what it holds."""
    load = f'import compatzoo\n\nbundle = compatzoo.load("{load_as}")\n'
    if config.upgrader and config.upgrader.direction == "query":
        return (f"```python\n{load}queries = bundle.upgrader.upgrade(new_query_embeddings)"
                f"  # ({config.old.embedding_dim}-d): search the old index\n```\n\n"
                "Compare embeddings with cosine similarity.")
    if config.old.encoder is None:
        return (f"```python\n{load}gallery = bundle.upgrade(stored_old_embeddings)"
                f"  # (N, {config.new.embedding_dim})\n```\n\n"
                "Compare embeddings with cosine similarity; query with the new model's "
                "embeddings.")
    side = ", side=stored_side" if config.side else ""
    return f"""```python
{load}queries = bundle.encode(query_images)               # new model, (N, {config.new.embedding_dim})
gallery = bundle.upgrade(stored_old_embeddings{side})
```

Compare embeddings with cosine similarity. `bundle.encode(images, model="old")` embeds
with the old model; `bundle.fingerprint` identifies it
(`{config.old.fingerprint[:16]}...`)."""


def model_card(config: BundleConfig, load_as: str = "path/to/this/bundle",
               meta: dict | None = None) -> str:
    """The card's text: YAML header (model-index) and how to use the bundle; ``load_as`` is
    the source the usage example loads (a short name, ``hf-hub:ORG/NAME``, a path)."""
    from huggingface_hub import ModelCard

    evaluation = config.evaluation
    metric = evaluation.get("primary", "")
    metrics = evaluation.get("metrics") or list(
        next(iter(evaluation.get("settings", {}).values()), {}))
    rows = "\n".join(f"| `{setting}` | {SETTINGS.get(setting, setting)} | "
                     + " | ".join(f"{100 * values[m]:.2f}" if m in values else "–"
                                  for m in metrics) + " |"
                     for setting, values in evaluation.get("settings", {}).items())
    upgrade = (f"an upgrader `{config.upgrader.name}` that maps stored "
               f"{config.old.generation} embeddings into the new space"
               + (f" (it reads {config.upgrader.side_dim} values of side information stored "
                  "beside each item)" if config.upgrader.side_dim else "")
               if config.upgrader else
               "no upgrader: the new model queries the stored old embeddings directly")
    if config.upgrader and config.upgrader.direction == "query":
        upgrade = (f"an adapter `{config.upgrader.name}` that maps new-model queries into "
                   "the old space, so the stored old gallery keeps serving unchanged")
    adapter_only = config.old.encoder is None
    note = f"\n{evaluation['protocol']}" if evaluation.get("protocol") else ""
    spec = yaml.safe_dump(config.spec, sort_keys=False)
    parent = f"; parent bundle `{config.parent}`" if config.parent else ""
    body = f"""
# {config.name}

{'An upgrade fitted with compatzoo on paired embeddings only' if adapter_only else
 'A compatible upgrade trained with compatzoo'}: the old model `{config.old.generation}`
({config.old.embedding_dim}-d), the new model `{config.new.generation}`
({config.new.embedding_dim}-d) and {upgrade}.{' The bundle holds no encoders: embed with '
'the models that produced the pairs.' if adapter_only else ''}
Lineage: {' -> '.join(config.lineage)}{parent}.

## Results ({config.experiment}, seed {config.seed})

| setting | meaning | {' | '.join(metrics)} |
|---|---|{'---|' * len(metrics)}
{rows}

{f'Primary metric: {metric}.' if metric else ''} Figures in percent, measured by the run that
trained these weights{' (stored here as float16)' if config.dtype == 'float16' else ''}.{note}

## Use

{_usage(config, load_as)}

## Training spec

```yaml
{spec}```
"""
    return str(ModelCard(f"---\n{card_data(config, meta).to_yaml()}\n---\n{body}"))
