"""``ldmflow registry list|promote|rollback``: the champion of a registered model, for people.

`promote` goes through the gate (training.eval.gate) unless `--force`; every move is recorded on the
versions (champion.by / at / from / action / why). Unknown models, versions and aliases end the
command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

ERROR_EXIT = 2
REFUSED_EXIT = 1
KEY_TAGS = ("run_id", "git_commit", "dataset_content_id", "config_hash", "gate.decision", "champion.action",
            "champion.by", "champion.at", "champion.from", "champion.why")


def _gate_config(args: argparse.Namespace):
    from training.config import load_config

    return load_config(args.config, args.set or [])


def _model_name(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    return _gate_config(args).tracking.model_name


def cmd_list(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from training.locations import setup_mlflow
    from training.mlops import registry

    setup_mlflow()
    client = MlflowClient()
    name = _model_name(args)
    model = registry.require_model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    print(f"{name}: champion history {' -> '.join(registry.champion_stack(client, name)) or 'none'}")
    print(f"{'version':>7}  {'aliases':<20} {'metrics':<44} tags")
    for mv in reversed(registry.model_versions(client, name)):
        metrics = " ".join(f"{k.removeprefix('gate.')}={v}" for k, v in sorted(mv.tags.items())
                           if k.startswith("gate.") and k.endswith("_adherence"))
        tags = " ".join(f"{k}={mv.tags[k]}" for k in KEY_TAGS if k in mv.tags)
        aliases = ",".join(sorted(by_version.get(str(mv.version), []))) or "-"
        print(f"{mv.version:>7}  {aliases:<20} {metrics or '-':<44} {tags}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from training.eval.gate import force_promote, promote_if_better

    name = _model_name(args)
    if args.force:
        move = force_promote(name, args.version, why=args.why or "forced by hand")
        print(f"{name}: champion {move.previous or 'none'} -> {move.version} (forced by {move.by})")
        return 0
    decision = promote_if_better(name, args.version, _gate_config(args).gate)
    print_decision(decision)
    return REFUSED_EXIT if args.require_promotion and not decision.promoted else 0


def print_decision(decision) -> None:
    """The gate's verdict and both models' scores on the one evaluation set."""
    champion = "" if decision.champion is None else f"; champion v{decision.champion_version} re-scored: " + \
        ", ".join(f"{k}={v:.4f}" for k, v in sorted(decision.champion.items()) if k.endswith("_adherence"))
    scores = ", ".join(f"{k}={v:.4f}" for k, v in sorted(decision.candidate.items()) if k.endswith("_adherence"))
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    print(f"{decision.name} v{decision.version}: {verdict}: {decision.reason}")
    if scores:
        print(f"  candidate: {scores}{champion}")


def cmd_rollback(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from training.locations import setup_mlflow
    from training.mlops import registry

    setup_mlflow()
    name = _model_name(args)
    move = registry.rollback(MlflowClient(), name, why=args.why or "rolled back by hand")
    print(f"{name}: champion {move.previous} -> {move.version} (rollback by {move.by})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; a registry problem is one line on stderr and exit code 2."""
    from mlflow.exceptions import MlflowException

    from training.errors import ConfigError
    from training.mlops.registry import RegistryError

    try:
        return args.registry_func(args)
    except (RegistryError, ConfigError) as e:
        message = str(e)
    except MlflowException as e:
        message = f"MLflow refused: {e.message}"
    print(f"ldmflow registry {args.registry_command}: error: {message}", file=sys.stderr)
    return ERROR_EXIT


def add_registry_parser(sub) -> None:
    """Add `registry` to the `ldmflow` subcommands."""
    p = sub.add_parser("registry", help="list versions, promote through the gate, roll the champion back")
    commands = p.add_subparsers(dest="registry_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", help="registered model name (default: the config's tracking.model_name)")
        q.add_argument("--config", default="configs/tiny.yaml", help="preset whose gate and model name apply")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set gate.margin=0.05 (repeatable)")

    q = commands.add_parser("list", help="versions with aliases, gate metrics and tags")
    common(q)
    q.set_defaults(registry_func=cmd_list)
    q = commands.add_parser("promote", help="make VERSION the champion if the gate says it beats the current one")
    common(q)
    q.add_argument("version", help="version number or alias (e.g. candidate)")
    q.add_argument("--force", action="store_true", help="skip the gate (recorded as a forced move)")
    q.add_argument("--why", help="reason recorded on the version for a forced move")
    q.add_argument("--require-promotion", action="store_true",
                   help=f"exit {REFUSED_EXIT} when the gate refuses (default: 0, the refusal printed)")
    q.set_defaults(registry_func=cmd_promote)
    q = commands.add_parser("rollback", help="restore the previous champion")
    common(q)
    q.add_argument("--why", help="reason recorded on the restored version")
    q.set_defaults(registry_func=cmd_rollback)
    p.set_defaults(func=run)
