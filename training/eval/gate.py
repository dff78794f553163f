"""The promotion gate: a registered version becomes `champion` only when it beats the current one.

Both models are scored in the same gate run, on the same seeded evaluation set (the same prompts,
noise and steps): the champion is re-scored rather than compared through a number some other
evaluation recorded. The candidate must clear `gate.floor` on `gate.floor_metric` and exceed the
champion on `gate.metric` by `gate.margin`; with no champion yet it must reach `gate.first_floor`.
Moves of one model are serialised by registry.promotion_lock, and the champion is read again just
before the alias moves, since MLflow alias writes are last-writer-wins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mlflow import MlflowClient

from training.config import GateConfig
from training.locations import setup_mlflow
from training.mlops import registry

log = logging.getLogger(__name__)

TAG_PREFIX = "gate."


@dataclass
class Scores:
    """One model's metrics on the gate's evaluation set."""

    metrics: dict[str, float]
    eval_set_id: str | None = None
    """Identity of the evaluation set, when the evaluation reports one."""


Scorer = Callable[[str, GateConfig], Scores]
"""(model URI, gate config) -> its scores on the set the config describes."""


def evaluation_scorer(model_uri: str, cfg: GateConfig) -> Scores:
    """Score with training.eval.evaluate on the config's seeded held-out set."""
    from training.eval.evaluate import evaluate_model

    evaluation = evaluate_model(model_uri, prompts=cfg.prompts, per_prompt=cfg.per_prompt, steps=cfg.steps,
                                seed=cfg.seed)
    metrics = {k: float(v) for k, v in evaluation.metrics.items() if isinstance(v, (int, float))}
    return Scores(metrics=metrics, eval_set_id=getattr(evaluation, "eval_set_id", None))


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    candidate: dict[str, float]
    champion_version: str | None = None
    """The champion the candidate was compared with (None: there was none)."""
    champion: dict[str, float] | None = None
    """That champion's scores, measured in this gate run on the same set."""
    eval_set_id: str | None = None


def _metric(scores: dict[str, float], key: str, who: str) -> float:
    if key not in scores:
        raise registry.RegistryError(f"gate metric {key!r} is not among the {who}'s evaluation metrics "
                                     f"({', '.join(sorted(scores))}); set gate.metric / gate.floor_metric")
    return scores[key]


def judge(cfg: GateConfig, candidate: dict[str, float], champion: dict[str, float] | None) -> tuple[bool, str]:
    """Whether `candidate` should replace `champion` (None: there is none), and why, in words."""
    floor_value = _metric(candidate, cfg.floor_metric, "candidate")
    value = _metric(candidate, cfg.metric, "candidate")
    if floor_value < cfg.floor:
        return False, f"{cfg.floor_metric} {floor_value:.4f} is below the floor {cfg.floor:.4f}"
    if champion is None:
        if value < cfg.first_floor:
            return False, (f"first version: {cfg.metric} {value:.4f} is below the first-version floor "
                           f"{cfg.first_floor:.4f}")
        return True, f"first version: {cfg.metric} {value:.4f} >= {cfg.first_floor:.4f}"
    best = _metric(champion, cfg.metric, "champion")
    # 1e-9: fractions of images, so 0.60 - 0.55 is a margin of 0.05 despite binary rounding.
    if value > best and value - best >= cfg.margin - 1e-9:
        return True, f"{cfg.metric} {value:.4f} beats the champion's {best:.4f} by >= {cfg.margin:.4f}"
    return False, f"{cfg.metric} {value:.4f} does not beat the champion's {best:.4f} by {cfg.margin:.4f}"


def _record(client: MlflowClient, name: str, version: str, cfg: GateConfig, decision: Decision) -> None:
    """Tag the candidate with what the gate measured and decided."""
    tags = {f"{TAG_PREFIX}{k}": f"{v:.4f}" for k, v in decision.candidate.items()}
    tags.update({
        TAG_PREFIX + "settings": json.dumps({"prompts": cfg.prompts, "per_prompt": cfg.per_prompt, "seed": cfg.seed,
                                             "steps": cfg.steps, "metric": cfg.metric, "margin": cfg.margin,
                                             "floor_metric": cfg.floor_metric, "floor": cfg.floor}, sort_keys=True),
        TAG_PREFIX + "decision": "promoted" if decision.promoted else "refused",
        TAG_PREFIX + "reason": decision.reason,
        TAG_PREFIX + "champion_version": decision.champion_version or "none",
    })
    if decision.champion is not None:
        tags[f"{TAG_PREFIX}champion.{cfg.metric}"] = f"{decision.champion[cfg.metric]:.4f}"
    if decision.eval_set_id:
        tags[TAG_PREFIX + "eval_set"] = decision.eval_set_id
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def promote_if_better(name: str, version: str, cfg: GateConfig | None = None, *, scorer: Scorer = evaluation_scorer,
                      by: str | None = None, max_attempts: int = 3) -> Decision:
    """Score version `version` of `name` and the current champion on one set, and move `champion` to
    the candidate if cfg's rule says so. The decision is tagged on the candidate (gate.*) and a move
    on the versions (champion.*). Holds the model's promotion lock throughout."""
    cfg = cfg or GateConfig()
    setup_mlflow()
    client = MlflowClient()
    version = str(registry.resolve_version(client, name, str(version)).version)
    uri = f"models:/{name}/{version}"
    with registry.promotion_lock(client, name):
        scored: dict[str, Scores] = {}
        for _ in range(max_attempts):
            champion = registry.current_champion(client, name)
            if champion and str(champion.version) == version:
                return Decision(name, version, False, "already the champion", {}, version)
            if version not in scored:
                scored[version] = scorer(uri, cfg)
            candidate = scored[version]
            champ_version = str(champion.version) if champion else None
            if champ_version is not None and champ_version not in scored:
                scored[champ_version] = scorer(f"models:/{name}/{champ_version}", cfg)
            champ = scored.get(champ_version) if champ_version else None
            if champ is not None and candidate.eval_set_id and champ.eval_set_id and \
                    candidate.eval_set_id != champ.eval_set_id:
                raise registry.RegistryError(f"the gate scored {name} v{version} and v{champ_version} on different "
                                             f"evaluation sets ({candidate.eval_set_id} vs {champ.eval_set_id})")
            promoted, reason = judge(cfg, candidate.metrics, champ.metrics if champ else None)
            decision = Decision(name, version, promoted, reason, candidate.metrics, champ_version,
                                champ.metrics if champ else None, candidate.eval_set_id)
            # Read again just before the move: an alias moved outside this lock (the MLflow UI, another
            # client) would make the comparison one with a champion that no longer is.
            now = registry.current_champion(client, name)
            if (str(now.version) if now else None) == champ_version:
                break
            log.info("%s: the champion moved to %s while the gate scored; comparing again", name,
                     now.version if now else None)
        else:
            raise registry.RegistryError(f"the champion of {name!r} kept moving while the gate scored v{version}; "
                                         f"try again")
        _record(client, name, version, cfg, decision)
        if promoted:
            registry.move_champion(client, name, version, action="gate", why=reason, by=by)
        log.info("%s v%s: %s (%s)", name, version, "promoted to champion" if promoted else "not promoted", reason)
        return decision


def force_promote(name: str, version: str, *, why: str, by: str | None = None) -> registry.Move:
    """Move `champion` to `version` without the gate (a person's decision, recorded as action `force`)."""
    setup_mlflow()
    client = MlflowClient()
    with registry.promotion_lock(client, name):
        return registry.move_champion(client, name, version, action="force", why=why, by=by)
