"""gdml ablate: the table (unit), and shrunken end to end (2 variants x 1 loss x 1 seed through Ray Tune, the table
from the MLflow child runs)."""

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from tests.conftest import TINY, cli_args
from tuning.ablate import VARIANTS, summarise


def test_summary_table_has_mean_and_std_per_variant():
    rows = [{"variant": v, "loss": "triplet", "seed": s, "recall_at_1": 0.1 * s, "map_at_r": 0.2, "nmi": 0.5}
            for v in VARIANTS for s in (1, 3)]
    table = summarise(rows, ["triplet"]).splitlines()
    assert table[0] == "| variant | triplet recall_at_1 | triplet map_at_r | triplet nmi |"
    assert table[2] == "| baseline | 0.2000 ± 0.1414 | 0.2000 ± 0.0000 | 0.5000 ± 0.0000 |"  # ddof=1
    assert len(table) == 2 + len(VARIANTS)


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_shrunken_ablation_runs_every_chosen_variant_loss_and_seed(tmp_path, tiny_shards, shared_ray, monkeypatch,
                                                                   capsys):
    overrides = {**TINY, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.max_steps_per_epoch": 2, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.experiment": "ablate", "train.workers": 1}
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ablate", *cli_args(overrides), "--losses", "contrastive", "--seeds", "0", "--variants",
                     "baseline", "+both", "--out", str(tmp_path / "table.md")]) == 0
    assert "2 runs in" in capsys.readouterr().out
    table = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["baseline", "+both"]  # one row each
    assert table[0].count("contrastive") == 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
    children = [r for r in runs if r.data.tags.get("mode") == "ablation"]
    assert {(r.data.params["model.attention.enabled"], r.data.params["model.adversary.enabled"],
             r.data.params["loss.name"]) for r in children} == {("False", "False", "contrastive"),
                                                                 ("True", "True", "contrastive")}
    assert len(children) == 2
    parent = next(r for r in runs if r.data.tags.get("mode") == "ablation-parent")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.md", "ablation_recall_at_1.png"}
    # the table cells are the children's own test metrics
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[2:]}
    for r in children:
        variant = "+both" if r.data.params["model.attention.enabled"] == "True" else "baseline"
        assert cells[variant] == f"{r.data.metrics['test/recall_at_1']:.4f}"


def test_each_loss_gets_its_columns_and_each_variant_its_seeds():
    rows = [{"variant": v, "loss": loss, "seed": s, "recall_at_1": 0.1 * s + (loss == "triplet"), "map_at_r": 0.2,
             "nmi": 0.5} for v in ("baseline", "+both") for loss in ("contrastive", "triplet") for s in (0, 2)]
    table = summarise(rows, ["triplet", "contrastive"], ["baseline", "+both"]).splitlines()
    assert table[0] == ("| variant | triplet recall_at_1 | triplet map_at_r | triplet nmi | contrastive recall_at_1 "
                        "| contrastive map_at_r | contrastive nmi |")
    assert table[2].split("|")[2].strip() == "1.1000 ± 0.1414" and table[2].split("|")[5].strip() == "0.1000 ± 0.1414"


def test_a_subset_of_variants_gets_a_row_each_in_the_given_order(capsys):
    rows = [{"variant": v, "loss": "triplet", "seed": 0, "recall_at_1": 0.1, "map_at_r": 0.2, "nmi": 0.5}
            for v in ("+both", "baseline")]
    table = summarise(rows, ["triplet"], ["baseline", "+both"]).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["baseline", "+both"]
    with pytest.raises(SystemExit) as exited:
        cli.main(["ablate", "--variants", "+attenton"])
    assert exited.value.code == 2 and "invalid choice: '+attenton'" in capsys.readouterr().err
