"""The README and docs stay true to the code: the config reference is current, linked files exist."""

from __future__ import annotations

import re
from pathlib import Path

from domino_ray.config import example_yaml

REPO = Path(__file__).resolve().parents[1]


def test_config_reference_is_generated_from_the_current_models():
    doc = (REPO / "docs" / "config-reference.md").read_text()
    assert example_yaml() in doc, "docs/config-reference.md is stale: run `make docs`"


def test_readme_shows_the_two_setup_commands_and_its_links_exist():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if not link.startswith("http"):
            assert (REPO / link).exists(), f"README links {link}, which does not exist"
