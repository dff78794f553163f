"""Third-party notices that say nothing to a user of a successful run, dropped where they arise.

Used by the CLI and the demo (pipelines/console.py) and by every local Ray worker at start-up
(training/launcher.py's worker_process_setup_hook), so the workers' output is as clean as the driver's.
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
    # The registered pyfunc declares its signature explicitly (training/registry.py); MLflow's advice
    # to give an input example (which it would run through a full generation at logging time) does
    # not apply.
    warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
    # DeepSpeed's ZeRO calls torch's deprecated all_gather_into_tensor alias, once per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
