"""ray_cluster.yaml is a valid Ray cluster-launcher config, as `ray up` would check it."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    cfg = prepare_config(raw)  # fills in the provider's defaults, as `ray up` does
    validate_config(cfg)  # raises jsonschema.ValidationError on any unknown or malformed field
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t["max_workers"] > 0 for n, t in types.items() if n != cfg["head_node_type"])
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "subjectdiff datagen weights" in setup


def test_a_broken_cluster_config_is_rejected():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    raw["available_node_types"]["head"]["min_workers"] = "zero"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(raw))
