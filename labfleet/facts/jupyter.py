"""Facts about the JupyterLab compose projects (labfleet.jupyter)."""

from __future__ import annotations

from typing import TypedDict

from pyinfra.api import FactBase

from labfleet import compose
from labfleet.facts.docker import api_answers, api_json, docker_api


class ComposeState(TypedDict):
    image_id: str | None  # the id the tag names on the host
    container_image: str | None  # the image id the project's container runs
    status: str | None  # running, exited, ...; None without a container
    health: str | None  # healthy, unhealthy, starting, none
    digest: str | None  # the settings digest the container was started with


class ComposeService(FactBase[ComposeState]):
    """The jupyterlab container of one compose project, and the image id its tag names now.

    Returns ``{"image_id", "container_image", "status", "health", "digest"}``; the
    container keys are None when there is no container.
    """

    def requires_command(self, *args, **kwargs) -> str:
        return "docker"

    @staticmethod
    def default() -> ComposeState:
        return ComposeState(image_id=None, container_image=None, status=None, health=None, digest=None)

    def command(self, project: str, image: str) -> str:
        self.project = project
        # One request each for the image and the container, in one curl (facts.docker_api).
        return docker_api(f"/images/{image}/json", f"/containers/{compose.container_name(project)}/json")

    def process(self, output):
        return self.read(output)[0]

    def read(self, output) -> tuple[ComposeState, dict | None]:
        """The state, and the container's whole inspect object when it is this project's."""
        state = self.default()
        answers = api_answers(output)
        answers += [(0, "")] * (2 - len(answers))  # the engine did not answer (or no curl yet)
        found_image, found_container = (api_json(*answer) for answer in answers[:2])
        if found_image:
            state["image_id"] = found_image.get("Id")
        if not found_container:
            return state, None
        labels = (found_container.get("Config") or {}).get("Labels") or {}
        project = getattr(self, "project", None)
        if project is not None and labels.get("com.docker.compose.project") != project:
            return state, None  # a container of that name outside this compose project
        run = found_container.get("State") or {}
        state["container_image"] = found_container.get("Image")
        state["status"] = run.get("Status")
        state["health"] = (run.get("Health") or {}).get("Status", "none")
        state["digest"] = labels.get(compose.CONFIG_LABEL)
        return state, found_container
