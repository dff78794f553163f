"""The markdown artifact each flow run publishes: counts, key metrics, the registered version and
links to the MLflow run and model."""

from __future__ import annotations

from collections.abc import Iterable

from training.locations import redact, tracking_uri


def mlflow_links(run_id: str | None = None, model: str | None = None, version: str | None = None) -> list[str]:
    """Markdown lines linking the run and the model version: UI links on an MLflow server, URIs on a
    local store (which has no UI address)."""
    uri = redact(tracking_uri())
    web = uri.startswith(("http://", "https://"))
    lines = []
    if run_id:
        if web:
            from mlflow import MlflowClient

            experiment = MlflowClient().get_run(run_id).info.experiment_id
            lines.append(f"- MLflow run: [{run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})")
        else:
            lines.append(f"- MLflow run: `runs:/{run_id}` (store `{uri}`)")
    if model and version:
        if web:
            lines.append(f"- model: [{model} v{version}]({uri.rstrip('/')}/#/models/{model}/versions/{version})")
        else:
            lines.append(f"- model: `models:/{model}/{version}`")
    return lines


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown(title: str, rows: Iterable[tuple[str, object]], links: Iterable[str] = (), notes: Iterable[str] = ()) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in rows]
    links, notes = list(links), list(notes)
    if links:
        lines += ["", *links]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def publish_report(key: str, title: str, rows: Iterable[tuple[str, object]], *, links: Iterable[str] = (),
                   notes: Iterable[str] = ()) -> str:
    """Create the flow run's markdown artifact `key` (lowercase, digits and dashes); returns the text."""
    from prefect.artifacts import create_markdown_artifact

    text = markdown(title, rows, links, notes)
    create_markdown_artifact(text, key=key, description=title)
    return text


def metric_rows(metrics: dict, keys: Iterable[str], prefix: str = "") -> list[tuple[str, object]]:
    return [(f"{prefix}{k}", metrics[k]) for k in keys if k in metrics]
