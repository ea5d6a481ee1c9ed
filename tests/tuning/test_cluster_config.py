import json
import os
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_validates_against_rays_own_schema():
    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert cluster["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("pip install" in c and "gdml" in c for c in cluster["setup_commands"])
    assert any("mlflow server" in c for c in cluster["head_start_ray_commands"])


def test_the_schema_check_catches_mistakes():
    import pytest

    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cluster["max_wrkers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wrkers"):
        jsonschema.validate(cluster, schema)
