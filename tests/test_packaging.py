"""What a wheel of compatzoo holds: every package of the source tree, and the model cards
of the top-level model_cards/ folder as compatzoo.model_cards."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_explicit_package_list_covers_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "compatzoo").rglob("__init__.py")}
    assert found | {"compatzoo.model_cards"} == listed
    assert config["package-dir"] == {"compatzoo.model_cards": "model_cards"}


def test_the_model_cards_install_as_package_data():
    from importlib import resources

    assert Path(str(resources.files("compatzoo.model_cards"))).resolve() == ROOT / "model_cards"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["compatzoo.model_cards"]
    shipped = [p.relative_to(ROOT / "model_cards") for p in (ROOT / "model_cards").rglob("*")
               if p.is_file() and p.name != "__init__.py"]
    assert shipped and all(any(path.match(pattern) for pattern in patterns) for path in shipped)
