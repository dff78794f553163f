"""Resume a DeepSpeed checkpoint on a different number of workers (elastic resume).

ZeRO-1/2/3 checkpoints are partitioned: each rank saved only its slice of the optimizer state (and,
under ZeRO-3, of the weights), and DeepSpeed refuses to load them on another data-parallel world
size. DeepSpeed's *universal checkpoint* is the way across: ``deepspeed.checkpoint.ds_to_universal``
rewrites the slices as one full fp32 tensor per parameter and state (``zero/<param>/fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``, plus ``zero/optimizer_state.pt``), and an engine
built with ``"checkpoint": {"load_universal": true}`` cuts them for its own world size::

    save    engine.save_checkpoint(dir, tag=tag, client_state=UNIVERSAL_CLIENT_STATE)
    resume  engine = deepspeed.initialize(..., config=deepspeed_universal_config(deepspeed_config(train)))
            tag_u = convert_to_universal(<checkpoint>/deepspeed, tag, scratch)   # scratch: this rank's own
            load_universal_checkpoint(engine, scratch, tag_u)

In a run, one rank converts, into its own scratch folder, and publishes the result into the
checkpoint's storage for every rank (training.checkpoint.universal_store); each rank then fetches
only the files its engine loads (:func:`universal_files_loaded`).

ZeRO-0 checkpoints are not partitioned: rank 0 saves the full module and optimizer state into
``mp_rank_00_model_states.pt``, and DeepSpeed checks the saved world size only for ZeRO partitions,
so they load on any number of workers as they are. DeepSpeed's converter has nothing to convert
there (it looks for optimizer partitions) and its universal loader would skip the module (it takes
weights from ``zero/`` only). So for stage 0 the same three calls do the right thing instead:
:func:`deepspeed_universal_config` leaves the config alone, :func:`convert_to_universal` copies the
one file, and :func:`load_universal_checkpoint` loads it the ordinary way.

Safety. DeepSpeed's converter and its universal loader call ``torch.load(weights_only=False)``
throughout. Here every such call goes through :func:`training.checkpoint.loading.safe_torch_load`: the
converter runs in this process (one extract and one merge worker: a process pool's children would
unpickle with DeepSpeed's own ``torch.load``), with ``torch.load`` replaced inside each DeepSpeed
module on the way (``_LOADING_MODULES``), and the engine's checkpoint engine replaced as in
:func:`training.checkpoint.loading.load_deepspeed_checkpoint`. A pickled object in a checkpoint is
refused with a CheckpointError before any of it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from training.checkpoint.layout import CheckpointError
from training.checkpoint.loading import safe_torch_load, torch_load_made_safe

log = logging.getLogger(__name__)

UNIVERSAL_CLIENT_STATE = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
"""The ``client_state`` of every ``engine.save_checkpoint``, so that the checkpoint converts.

ds_to_universal refuses a ZeRO-1/2 checkpoint whose model states lack ``universal_checkpoint_info``
(DeepSpeed's UNIVERSAL_CHECKPOINT_INFO): the model's declaration of which parameters are tensor- or
pipeline-parallel and how to merge them. This UNet is purely data-parallel, so it declares no
patterns, only the format version (UNIVERSAL_CHECKPOINT_VERSION_KEY/_VALUE of DeepSpeed 0.19.8, what
the converter's own ``--inject_missing_state`` writes). ZeRO-0 and ZeRO-3 conversion do not read it."""

UNIVERSAL_SUFFIX = "_universal"

_LOADING_MODULES = (
    # the converter, the ZeRO-1/2 checkpoint reader it builds on, and their helpers
    "deepspeed.checkpoint.ds_to_universal",
    "deepspeed.checkpoint.deepspeed_checkpoint",
    "deepspeed.checkpoint.zero_checkpoint",
    "deepspeed.checkpoint.reshape_3d_utils",
    "deepspeed.checkpoint.autoep_universal",
    # the universal loader: zero/optimizer_state.pt (ZeRO-1/2, bf16), per-parameter files (ZeRO-1/2),
    # both (ZeRO-3)
    "deepspeed.runtime.base_optimizer",
    "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.runtime.zero.stage3",
)
"""The DeepSpeed 0.19.8 modules on the conversion and universal-loading paths that call torch.load,
all with weights_only=False. tests/training/checkpoint/test_elastic_resume.py fails if one is missed."""

_ZERO3_MODEL_FILE = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")


def deepspeed_universal_config(base: dict) -> dict:
    """`base` (worker.deepspeed_config) for an engine that will load a checkpoint written by a
    different number of workers. DeepSpeed reads the flag when the engine is built, so the engine
    must be built with it; it changes only how load_checkpoint reads (the engine saves ordinary
    checkpoints after). ZeRO-0 is left as it is (see the module docstring)."""
    if int(base.get("zero_optimization", {}).get("stage", 0)) == 0:
        return dict(base)
    return {**base, "checkpoint": {**base.get("checkpoint", {}), "load_universal": True}}


def convert_to_universal(deepspeed_dir: Path, tag: str, out_dir: Path) -> str:
    """Convert ``deepspeed_dir/tag`` (every rank's files, written by any number of ranks) into a
    universal checkpoint ``out_dir/<tag>_universal`` (and ``out_dir/latest_universal``); returns
    that tag for :func:`load_universal_checkpoint`. `out_dir` must be private to this process.

    Needs disk for an fp32 copy of the weights and of both Adam moments (12 bytes per parameter)
    plus the temporary fragments, which it removes. Raises CheckpointError when the checkpoint
    cannot be converted or holds anything but tensors and plain data."""
    source = Path(deepspeed_dir) / tag
    out_dir = Path(out_dir)
    target = out_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    shutil.rmtree(target, ignore_errors=True)  # left by a conversion that was interrupted
    out_dir.mkdir(parents=True, exist_ok=True)

    with _safe_deepspeed_loads():
        stage, saved_world_size, has_info = _describe(source)
        hint = f"resume with train.num_workers={saved_world_size}, the number of workers that wrote it"
        if stage == 0:  # not partitioned: loads on any world size as it is
            target.mkdir()
            shutil.copy2(source / "mp_rank_00_model_states.pt", target)
        elif stage in (1, 2) and not has_info:
            raise CheckpointError(
                f"cannot resume {source} on a different number of workers: it carries no "
                "universal_checkpoint_info (it was saved without training.checkpoint.elastic.UNIVERSAL_CLIENT_STATE, "
                f"by an older ldmflow); {hint}"
            )
        else:
            _run_converter(source, target, hint)
    (out_dir / "latest_universal").write_text(target.name)
    log.info("converted %s (ZeRO-%d, %d ranks) into universal checkpoint %s", source, stage, saved_world_size, target)
    return target.name


def load_universal_checkpoint(engine, directory: Path, tag: str, *, place_steps: bool = True) -> None:
    """engine.load_checkpoint of ``directory/tag`` made by :func:`convert_to_universal`, with every
    torch.load on the way made safe. The engine must have been built with
    :func:`deepspeed_universal_config`; global steps, LR schedule, weights and optimizer state are
    restored, the data-parallel world size is the engine's own. `place_steps` puts Adam's loaded
    ``step`` where the optimizer needs it (:func:`place_optimizer_steps`); False only to observe
    DeepSpeed's own behaviour (bench/gpu.py)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if engine.zero_optimization_stage() > 0 and not engine.load_universal_checkpoint():
        raise CheckpointError("the engine was not built to load a universal checkpoint: build it with "
                              "training.checkpoint.elastic.deepspeed_universal_config(deepspeed_config(train))")
    if not (Path(directory) / tag).is_dir():
        raise CheckpointError(f"no universal checkpoint {Path(directory) / tag}: convert it with convert_to_universal")
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"cannot load safely through DeepSpeed's {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    try:
        with _safe_deepspeed_loads():
            load_path, _ = engine.load_checkpoint(str(directory), tag=tag)
    finally:
        del engine.checkpoint_engine.load  # back to the class's method
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load universal checkpoint {Path(directory) / tag}")
    if place_steps:
        place_optimizer_steps(getattr(engine.optimizer, "optimizer", engine.optimizer))


def place_optimizer_steps(optimizer) -> int:
    """Move each parameter's ``state["step"]`` of a fused or capturable torch optimizer to the
    parameter's device as float32, as torch's own ``Optimizer.load_state_dict`` does; returns how
    many were changed.

    DeepSpeed 0.19.8's universal loader (``load_hp_checkpoint_state_from_checkpoint_dir``) assigns
    ``state[hp_param]["step"]`` directly from ``step.pt``, which ``torch.load`` returns on the CPU,
    bypassing load_state_dict's placement; ``torch.optim.AdamW(fused=True)`` on CUDA then finds its
    step on another device than the parameters (issue 15). Non-fused optimizers keep a CPU step,
    which is what they expect, so they are left alone."""
    changed = 0
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or "step" not in state:
                continue
            step = state["step"]
            if not torch.is_tensor(step) or step.device != param.device or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device)
                changed += 1
    return changed


def universal_files_loaded(engine) -> Callable[[str], bool]:
    """Which files of a universal checkpoint (paths inside its tag folder) `engine` reads when it
    loads it, so that a rank fetches only those. Under ZeRO-1/2 a rank loads a parameter's folder
    (``zero/<name>/``) only where its own partition holds a fragment of that parameter (DeepSpeed
    0.19.8's load_hp_checkpoint_state_from_checkpoint_dir skips a parameter whose ``_hp_mapping`` is
    None), plus the shared files; ZeRO-3 ranks read every parameter's files, ZeRO-0 the one file."""
    if engine.zero_optimization_stage() not in (1, 2):
        return lambda rel: True
    own = {name for param, name in engine.param_names.items() if getattr(param, "_hp_mapping", None) is not None}

    def loaded(rel: str) -> bool:
        parts = rel.split("/")
        return not (len(parts) == 3 and parts[0] == "zero") or parts[1] in own

    return loaded


# --- internals --------------------------------------------------------------------------------


@contextmanager
def _safe_deepspeed_loads() -> Iterator[None]:
    """Within the DeepSpeed modules that load checkpoints, torch.load is safe_torch_load."""
    with ExitStack() as stack:
        for name in _LOADING_MODULES:
            stack.enter_context(torch_load_made_safe(importlib.import_module(name)))
        yield


def _describe(source: Path) -> tuple[int, int, bool]:
    """(ZeRO stage, data-parallel world size, has universal_checkpoint_info) of a checkpoint tag,
    from its file layout and one model-states file."""
    model_files = sorted(source.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{source} holds no DeepSpeed model states: not a DeepSpeed checkpoint tag")
    zero3 = [f for f in model_files if _ZERO3_MODEL_FILE.fullmatch(f.name)]
    model_file = zero3[0] if zero3 else model_files[0]
    state = safe_torch_load(model_file, map_location="cpu")
    if not isinstance(state, dict) or "dp_world_size" not in state:
        raise CheckpointError(f"{model_file} is not a DeepSpeed model-states file")
    if zero3:
        stage = 3
    elif not any(source.glob("*optim_states.pt")):
        stage = 0  # the optimizer state is inside mp_rank_00_model_states.pt
    else:
        stage = int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 1)) or 1
    return stage, int(state["dp_world_size"]), "universal_checkpoint_info" in state


def _run_converter(source: Path, target: Path, hint: str) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(target),
        # One worker each: the converter then runs in this process, where torch.load is made safe.
        num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )
    try:
        ds_to_universal.main(args)
    except CheckpointError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except Exception as e:  # DeepSpeed reports unconvertible layouts with asserts, ValueErrors, ...
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"DeepSpeed could not convert {source} into a universal checkpoint "
                              f"({type(e).__name__}: {e}); {hint}") from e
