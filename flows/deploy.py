"""`tuneline deploy`: what `deployments/prefect.yaml` describes, created on the current Prefect server
for one recipe.

The YAML file stays the one place that names the deployments (flow entry point, description, work
pool, schedules), so `prefect deploy` reads it too. `tuneline deploy RECIPE` adds what only the
recipe knows: every deployment is named after the recipe (`refresh/<recipe name>`; several recipes
live side by side on one server), gets the recipe as its `recipe` parameter (the UI's form starts
from it), and the `refresh` deployment gets the recipe's `refresh` schedule. Flows are loaded from
the installed package (`flows/refresh.py:refresh` is `tuneline.flows.refresh:refresh`), so a
worker needs Tuneline installed and nothing pulled; a process worker runs them in the project
folder the command ran in, where the recipe's relative paths point.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval, Schedule
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import ValidationError

from tuneline.errors import UserError
from tuneline.recipe import Recipe

PREFECT_FILE = Path("deployments") / "prefect.yaml"
FLOW_FOLDER = "flows/"  # installed as the tuneline.flows package (pyproject's package-dir)
REFRESH_FLOW = "refresh"  # its schedule comes from the recipe's `refresh` section


class DeployError(UserError):
    """The deployment file, a schedule or the recipe cannot make the deployments."""


@dataclass
class Planned:
    """One deployment as it will be created: `flow/name`, its schedules and where it runs."""

    flow: str
    name: str
    entrypoint: str
    description: str
    work_pool: str
    schedules: list[Schedule] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: ConcurrencyLimitConfig | None = None

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


def read_prefect_file(path: Path) -> list[dict[str, Any]]:
    """The `deployments` list of a prefect.yaml, each with a name and an entrypoint."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise DeployError(
            f"{path}: {error.strerror}; run from the project folder or pass --prefect-file"
        ) from None
    except yaml.YAMLError as error:
        raise DeployError(f"{path}: not valid YAML: {error}") from None
    deployments = config.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise DeployError(f"{path}: no `deployments` list; see Prefect's prefect.yaml format")
    for index, entry in enumerate(deployments):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("entrypoint"):
            raise DeployError(f"{path}: deployments[{index}] needs a `name` and an `entrypoint`")
    return deployments


def package_entrypoint(entrypoint: str, where: str) -> str:
    """`flows/refresh.py:refresh` -> `tuneline.flows.refresh:refresh` (the installed module)."""
    file, _, function = entrypoint.partition(":")
    if not (file.startswith(FLOW_FOLDER) and file.endswith(".py") and function):
        raise DeployError(
            f"{where}: entrypoint {entrypoint!r} is not one of Tuneline's flows; use flows/<module>.py:<flow>"
        )
    return f"tuneline.flows.{file.removeprefix(FLOW_FOLDER).removesuffix('.py')}:{function}"


def load_flow(entrypoint: str, where: str) -> Any:
    """The flow object an entrypoint names, imported from the installed package."""
    module_name, _, function = package_entrypoint(entrypoint, where).partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise DeployError(f"{where}: cannot load {entrypoint!r}: {error}") from None


def recipe_schedules(recipe: Recipe) -> list[Schedule]:
    """The recipe's `refresh` schedule (cron or interval), or none when it has no `refresh`."""
    if recipe.refresh is None:
        return []
    kind, value, timezone = recipe.refresh.schedule()
    if kind == "cron":
        return [Cron(str(value), timezone=timezone)]
    return [Interval(timedelta(seconds=float(value)), timezone=timezone)]


def file_schedule(entry: dict[str, Any], where: str) -> list[Schedule]:
    """A prefect.yaml schedule entry: `cron` or `interval` (seconds), with an optional `timezone`."""
    timezone = entry.get("timezone")
    try:
        if "cron" in entry:
            return [Cron(str(entry["cron"]), timezone=timezone)]
        if "interval" in entry:
            return [Interval(timedelta(seconds=float(entry["interval"])), timezone=timezone)]
    except ValueError as error:
        raise DeployError(f"{where}: {error}") from None
    raise DeployError(f"{where}: a schedule needs `cron` or `interval` (seconds)")


def concurrency(value: Any, where: str) -> ConcurrencyLimitConfig | None:
    """prefect.yaml's `concurrency_limit`: a number, or `{limit, collision_strategy}`."""
    if value is None:
        return None
    try:
        return ConcurrencyLimitConfig.model_validate(value if isinstance(value, dict) else {"limit": value})
    except ValidationError as error:
        raise DeployError(f"{where}: concurrency_limit {value!r}: {error.errors()[0]['msg']}") from None


def plan_deployments(
    recipe: Recipe,
    prefect_file: Path = PREFECT_FILE,
    only: list[str] | None = None,
    every: dict[str, float] | None = None,
    parameters: dict[str, dict[str, Any]] | None = None,
) -> list[Planned]:
    """The deployments the file describes, for this recipe. `only` keeps those flows; `every`
    replaces a flow's schedules by an interval in seconds (a test's short schedule); `parameters`
    adds parameters by flow name (e.g. retention's `now`)."""
    planned, extra = [], parameters or {}
    for index, entry in enumerate(read_prefect_file(prefect_file)):
        where = f"{prefect_file}: deployments[{index}] ({entry['name']})"
        flow = load_flow(entry["entrypoint"], where)
        if only and flow.name not in only:
            continue
        if every and flow.name in every:
            schedules = [Interval(timedelta(seconds=every[flow.name]))]
        elif flow.name == REFRESH_FLOW and recipe_schedules(recipe):
            schedules = recipe_schedules(recipe)  # the recipe's `refresh` section decides
        else:
            schedules = [s for item in entry.get("schedules") or [] for s in file_schedule(item, where)]
        planned.append(
            Planned(
                flow=flow.name,
                name=recipe.name,
                entrypoint=entry["entrypoint"],
                description=str(entry.get("description") or flow.description or ""),
                work_pool=(entry.get("work_pool") or {}).get("name") or "tuneline",
                schedules=schedules,
                parameters={"recipe": recipe.model_dump(mode="json"), **extra.get(flow.name, {})},
                concurrency_limit=concurrency(entry.get("concurrency_limit"), where),
            )
        )
    missing = set(only or ()) - {p.flow for p in planned}
    if missing:
        raise DeployError(f"--only {', '.join(sorted(missing))}: no such deployment in {prefect_file}")
    return planned


def ensure_work_pool(name: str) -> bool:
    """Create a process work pool of that name unless one exists; True when it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def apply_deployments(planned: list[Planned], project_dir: Path) -> dict[str, str]:
    """Create or update each deployment on the current server; their ids by full name.

    Process workers run the flows in `project_dir`; other work pool types use their own job
    template (the image's working folder).
    """
    ids = {}
    for item in planned:
        flow = load_flow(item.entrypoint, item.full_name)
        process = is_process_pool(item.work_pool)
        deployment = flow.to_deployment(
            name=item.name,
            description=item.description,
            schedules=item.schedules,
            concurrency_limit=item.concurrency_limit,
            parameters=item.parameters,
            work_pool_name=item.work_pool,
            job_variables={"working_dir": str(project_dir.resolve())} if process else {},
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        ids[item.full_name] = str(deployment.apply(work_pool_name=item.work_pool))
    return ids


def deploy(api_url: str, planned: list[Planned], project_dir: Path) -> list[str]:
    """Create the work pools (process type) and deployments on the server at `api_url`; returns
    the names of the pools it created."""
    with temporary_settings({PREFECT_API_URL: api_url}):
        created = [pool for pool in sorted({item.work_pool for item in planned}) if ensure_work_pool(pool)]
        apply_deployments(planned, project_dir)
    return created


def is_process_pool(name: str) -> bool:
    with get_client(sync_client=True) as client:
        return client.read_work_pool(name).type == "process"


def describe_schedules(schedules: list[Schedule]) -> str:
    """`cron 0 3 * * * (UTC)`, `every 3600 s`, or `none (runs from the UI or CLI)`."""
    words = []
    for schedule in schedules:
        if schedule.cron:
            words.append(f"cron {schedule.cron} ({schedule.timezone or 'UTC'})")
        elif schedule.interval:
            words.append(f"every {schedule.interval.total_seconds():g} s")
    return ", ".join(words) or "none (runs from the UI or CLI)"
