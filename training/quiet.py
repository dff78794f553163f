"""Third-party notices that say nothing to a user of a successful run, dropped where they arise.

Used by the CLI and the demo (pipelines/console.py) and by every local Ray worker at start-up
(quiet_ray_internals, the local Ray's worker_process_setup_hook), so the workers' output is as clean as the driver's.
"""

from __future__ import annotations

import logging
import warnings


class DropMessages(logging.Filter):
    """A logger filter that drops records whose message contains any of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_libraries() -> None:
    # diffusers imports every pipeline's image processors; without torchvision (not needed for
    # text-to-image training) transformers says so once per processor class.
    logging.getLogger("transformers.utils.import_utils").addFilter(DropMessages("requires torchvision"))
    # The pipeline's text encoder is whatever the config names (MiniLM in the presets), not the CLIP
    # model StableDiffusionPipeline's annotations expect; it warns on every load, though it works.
    logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(DropMessages("Expected types for text_encoder"))
    # The registered pyfunc declares its signature explicitly (training.mlops.registry); MLflow's advice
    # to give an input example (which it would run through a full generation at logging time) does
    # not apply.
    warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
    # DeepSpeed's ZeRO calls torch's deprecated all_gather_into_tensor alias, once per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def quiet_ray_internals() -> None:
    """Runs in every local Ray worker process at start-up.

    Ray Train v2's PlacementGroupCleaner polls the State API, which is served by the dashboard; a
    local Ray started without it (no ray[default] extras: fewer processes on a small machine) makes
    the cleaner warn every second for the whole run. Its only job here, freeing placement groups
    if the controller dies, still works: ray.shutdown() frees them too.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Each rank logs every ray.train.report with its full metrics dict at INFO ("Reporting training
    # result N: TrainingReport(...)"); the loop logs its own progress line. That logger is named by
    # its file's path.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    quiet_libraries()
