"""Facts about the JupyterLab compose projects (labfleet.jupyter)."""

from __future__ import annotations

from pyinfra.api import FactBase

from labfleet import compose
from labfleet.facts.docker import api_answers, api_json, docker_api


class ComposeService(FactBase):
    """The jupyterlab container of one compose project, and the image id its tag names now.

    Returns ``{"image_id", "container_image", "status", "health", "digest"}``; the
    container keys are None when there is no container.
    """

    requires_command = "docker"

    @staticmethod
    def default():
        return dict.fromkeys(("image_id", "container_image", "status", "health", "digest"))

    def command(self, project: str, image: str) -> str:
        self.project = project
        # One request each for the image and the container, in one curl (facts.docker_api).
        return docker_api(f"/images/{image}/json", f"/containers/{compose.container_name(project)}/json")

    def process(self, output):
        return self.read(output)[0]

    def read(self, output) -> tuple[dict, dict | None]:
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
        state.update(
            container_image=found_container.get("Image"),
            status=run.get("Status"),
            health=(run.get("Health") or {}).get("Status", "none"),
            digest=labels.get(compose.CONFIG_LABEL),
        )
        return state, found_container
