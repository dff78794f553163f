"""The promotion gate against a real MLflow server: who becomes champion and why, the champion
re-scored on the candidate's set, moves serialised and recorded, rollback; one test scores real
tiny models with training.eval.evaluate. Other tests inject the scorer so they take seconds."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest
from mlflow import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.training.tiny_pipeline import save_tiny_pipeline
from training.config import GateConfig, config_from_dict
from training.eval.evaluate import evaluate_model
from training.eval.gate import Scores, force_promote, judge, promote_if_better
from training.locations import setup_mlflow
from training.mlops import registry
from training.mlops.registry import CHAMPION, RegistryError, register_pipeline
from training.mlops.tracking import ensure_experiment
from training.models.sampling import SamplerDefaults

CFG = GateConfig(margin=0.05, floor=0.5, first_floor=0.3)


def test_judge_applies_floor_margin_and_first_version_floor():
    good = {"shape_adherence": 0.6, "colour_adherence": 0.9}
    assert judge(CFG, good, None)[0]
    assert not judge(CFG, {"shape_adherence": 0.2, "colour_adherence": 0.9}, None)[0]  # first-version floor
    assert not judge(CFG, {"shape_adherence": 0.9, "colour_adherence": 0.4}, None)[0]  # colour floor
    assert judge(CFG, good, {"shape_adherence": 0.55, "colour_adherence": 1.0})[0]  # by exactly the margin
    assert not judge(CFG, good, {"shape_adherence": 0.56, "colour_adherence": 1.0})[0]
    assert not judge(GateConfig(margin=0.0), good, {"shape_adherence": 0.6})[0]  # a tie never promotes
    with pytest.raises(RegistryError, match="seen_shape_adherence"):
        judge(GateConfig(metric="seen_shape_adherence"), good, None)


def test_gate_section_is_typed_validated_and_not_hashed():
    base = config_from_dict({})
    other = config_from_dict({"gate": {"margin": 0.1, "metric": "seen_shape_adherence"}})
    assert other.gate.margin == 0.1 and other.hash == base.hash
    with pytest.raises(ValueError, match="gate.margin"):
        config_from_dict({"gate": {"margin": 2}})
    with pytest.raises(ValueError, match="unknown config key `gate.marjin`"):
        config_from_dict({"gate": {"marjin": 0.1}})


@pytest.fixture(scope="module")
def server(mlflow_server) -> MlflowServer:
    """The session's server (tests/conftest.py): this module's experiment and model names are its own."""
    return mlflow_server


@pytest.fixture
def client(server, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    setup_mlflow()
    return MlflowClient()


def new_model(client: MlflowClient, name: str, n: int) -> list[str]:
    """`n` versions without artifacts: the scorer is injected, so only the registry entries matter."""
    client.create_registered_model(name)
    with mlflow.start_run(experiment_id=ensure_experiment("ldmflow-gate-test")) as run:
        pass  # the server accepts a version source only inside some run's artifacts
    return [str(client.create_model_version(name, f"{run.info.artifact_uri}/unused{i}", run_id=run.info.run_id).version)
            for i in range(n)]


class TableScorer:
    """Scores from a table by version, shifted by the evaluation seed: a number recorded by an
    evaluation on another set would not match what this gate run measures."""

    def __init__(self, table: dict[str, tuple[float, float]], delay: float = 0.0):
        self.table, self.delay, self.calls = table, delay, []

    def __call__(self, uri: str, cfg: GateConfig) -> Scores:
        start = time.monotonic()
        time.sleep(self.delay)
        shape, colour = self.table[uri.rsplit("/", 1)[1]]
        self.calls.append((uri, cfg.seed, start, time.monotonic()))
        return Scores({"shape_adherence": shape + cfg.seed / 100, "colour_adherence": colour},
                      eval_set_id=f"set-{cfg.seed}")


def test_champion_moves_only_when_beaten_on_the_same_set_and_rollback_restores(client, monkeypatch):
    monkeypatch.setenv("LDMFLOW_USER", "alice")
    name = "gate-rules"
    v1, v2, v3, v4 = new_model(client, name, 4)
    scorer = TableScorer({v1: (0.5, 0.9), v2: (0.53, 0.9), v3: (0.9, 0.2), v4: (0.7, 0.9)})

    first = promote_if_better(name, v1, CFG, scorer=scorer)
    assert first.promoted and first.champion_version is None
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1

    # Scored on another set (seed 7), the champion is re-scored there too: 0.57 vs 0.60, not 0.50.
    seeded = GateConfig(margin=0.05, floor=0.5, first_floor=0.3, seed=7)
    close = promote_if_better(name, v2, seeded, scorer=scorer)
    assert not close.promoted and close.champion_version == v1
    assert close.champion["shape_adherence"] == pytest.approx(0.57)
    assert (f"models:/{name}/{v1}", 7) in [(uri, seed) for uri, seed, *_ in scorer.calls]
    assert client.get_model_version(name, v2).tags["gate.decision"] == "refused"
    assert client.get_model_version(name, v2).tags["gate.eval_set"] == "set-7"

    assert not promote_if_better(name, v3, CFG, scorer=scorer).promoted  # colour below the floor
    best = promote_if_better(name, v4, CFG, scorer=scorer)
    assert best.promoted and best.champion_version == v1
    tags = client.get_model_version(name, v4).tags
    assert (tags["champion.from"], tags["champion.action"], tags["champion.by"]) == (v1, "gate", "alice")
    assert tags["gate.shape_adherence"] == "0.7000" and "beats" in tags["champion.why"]
    assert client.get_model_version(name, v1).tags["champion.replaced_by"] == v4
    assert promote_if_better(name, v4, CFG, scorer=scorer).reason == "already the champion"

    back = registry.rollback(client, name, why="v4 broke a consumer")
    assert (back.version, back.previous, back.action) == (v1, v4, "rollback")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1
    assert client.get_model_version(name, v1).tags["champion.why"] == "v4 broke a consumer"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(client, name, why="again")

    forced = force_promote(name, v3, why="demo needs it")
    assert (forced.previous, forced.version) == (v1, v3)
    assert client.get_model_version(name, v3).tags["champion.action"] == "force"


def test_promotions_of_one_model_are_serialised(client):
    name = "gate-serial"
    versions = new_model(client, name, 3)
    scorer = TableScorer({v: (0.4 + 0.2 * i, 0.9) for i, v in enumerate(versions)}, delay=0.5)
    promote_if_better(name, versions[0], CFG, scorer=scorer)
    scorer.calls.clear()
    threads = [threading.Thread(target=promote_if_better, args=(name, v, CFG), kwargs={"scorer": scorer})
               for v in versions[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # Each gate run scores two models under the lock; runs never interleave.
    spans = sorted(scorer.calls, key=lambda c: c[2])
    runs = [spans[i:i + 2] for i in range(0, len(spans), 2)]
    assert len(runs) == 2 and runs[0][-1][3] <= runs[1][0][2]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == versions[2]
    assert not any(m.name.endswith(registry.LOCK_SUFFIX) for m in client.search_registered_models())


def test_an_expired_lock_is_broken_and_a_live_one_named(client):
    name = "gate-lock"
    (v1,) = new_model(client, name, 1)
    lock = name + registry.LOCK_SUFFIX
    client.create_registered_model(lock, tags={"owner": "crashed@elsewhere", "expires": str(time.time() - 1)})
    assert promote_if_better(name, v1, CFG, scorer=TableScorer({v1: (0.5, 0.9)})).promoted
    client.create_registered_model(lock, tags={"owner": "bob@ci", "expires": str(time.time() + 600)})
    with pytest.raises(RegistryError, match="bob@ci"):
        with registry.promotion_lock(client, name, wait_s=1.0, poll_s=0.2):
            pass


def test_a_champion_moved_by_hand_while_scoring_is_compared_again(client):
    name = "gate-moved"
    v1, v2, v3 = new_model(client, name, 3)
    client.set_registered_model_alias(name, CHAMPION, v1)

    class MovesChampion(TableScorer):
        def __call__(self, uri, cfg):
            if uri.endswith(f"/{v3}") and len(self.calls) == 0:
                client.set_registered_model_alias(name, CHAMPION, v2)  # someone in the MLflow UI
            return super().__call__(uri, cfg)

    scorer = MovesChampion({v1: (0.1, 0.9), v2: (0.8, 0.9), v3: (0.6, 0.9)})
    decision = promote_if_better(name, v3, CFG, scorer=scorer)
    assert decision.champion_version == v2 and not decision.promoted
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v2


def test_different_evaluation_sets_are_refused(client):
    name = "gate-sets"
    v1, v2 = new_model(client, name, 2)
    client.set_registered_model_alias(name, CHAMPION, v1)

    def scorer(uri, cfg):
        return Scores({"shape_adherence": 0.9, "colour_adherence": 0.9}, eval_set_id=uri)

    with pytest.raises(RegistryError, match="different evaluation sets"):
        promote_if_better(name, v2, CFG, scorer=scorer)


def test_unknown_model_version_and_alias_are_one_clear_error(client):
    with pytest.raises(RegistryError, match="no registered model 'gate-nothing'"):
        promote_if_better("gate-nothing", "1", CFG, scorer=TableScorer({}))
    (v1,) = new_model(client, "gate-known", 1)
    with pytest.raises(RegistryError, match="no version or alias 'champion'.*versions: 1"):
        registry.resolve_version(client, "gate-known", "champion")


def test_real_evaluation_of_tiny_models_rescored_on_the_same_set(client, tmp_path):
    """Two tiny (untrained) pipelines scored by training.eval.evaluate: the gate's champion numbers
    are exactly what evaluating the champion on the gate's settings gives."""
    name = "gate-real"
    experiment = ensure_experiment("ldmflow-gate-test")
    folder = save_tiny_pipeline(tmp_path / "pipeline", SamplerDefaults(steps=2))
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment) as run:
            pass
        versions.append(register_pipeline(run.info.run_id, folder, name, {}).version)
    cfg = GateConfig(prompts=2, per_prompt=1, steps=2, seed=3, floor=0.0, first_floor=0.0, margin=0.0)
    first = promote_if_better(name, versions[0], cfg)
    assert first.promoted and set(first.candidate) >= {"shape_adherence", "colour_adherence"}
    second = promote_if_better(name, versions[1], cfg)
    direct = evaluate_model(f"models:/{name}/{versions[0]}", prompts=2, per_prompt=1, steps=2, seed=3)
    assert second.champion_version == versions[0]
    assert second.champion["shape_adherence"] == direct.metrics["shape_adherence"]
    # The same pipeline in both versions: equal scores, and a tie does not promote.
    assert second.candidate["shape_adherence"] == second.champion["shape_adherence"] and not second.promoted
