"""The prompt encoder: transformers' `UMT5EncoderModel` with the T5 tokenizer.

Prompts become `[B, max_length, D]` embeddings: the encoder's output for the prompt's tokens
(its `</s>` included) followed by exact zeros, as upstream's `_get_t5_prompt_embeds`. The
negative / dropped prompt is the embedding of "".
"""

from __future__ import annotations

import string
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vaops.models.atomic import write_folder_atomically
from vaops.models.config import TextEncoderConfig

TEXT_ENCODER_SUBFOLDER = "text_encoder"
TOKENIZER_SUBFOLDER = "tokenizer"

# transformers' UMT5 and T5 classes (and diffusers' prompt_clean below) are imported where an encoder
# is built or loaded: ~4 s of CPU a process that every importer of this file paid (the registry, the
# trainer, the pipeline's steps), most of which never build one.
if TYPE_CHECKING:
    from transformers import T5TokenizerFast, UMT5EncoderModel

# The tiny tokenizer's whole words; anything else falls back to single characters.
_TINY_WORDS = (
    "a an the and or of to in into on onto from with at by up down left right top bottom front back "
    "pick place put move push pull lift lower open close grasp release stack insert rotate turn press "
    "hand arm gripper robot object cube block bowl cup mug plate bottle box drawer shelf table "
    "red green blue yellow black white small large first second then"
).split()


def build_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """A small T5 tokenizer built offline: T5's own pipeline over a tiny Unigram vocabulary.

    Ids follow T5's convention (`<pad>` 0, `</s>` 1, `<unk>` 2); pieces are single characters
    and a fixed list of whole words, so every ASCII prompt tokenises without `<unk>`.
    """
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(c, -8.0) for c in chars]
    vocab += [("\u2581" + w, -4.0) for w in _TINY_WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


class TextEncoder:
    """A UMT5 encoder and its tokenizer, producing zero-padded prompt embeddings."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: T5TokenizerFast, max_length: int = 512):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        # Sessions reset from several threads at once (`vaops serve --compute-threads`); a fast tokenizer's call
        # may set its padding and truncation on the shared Rust object, which raises "Already borrowed" when
        # another thread is inside it (huggingface/tokenizers#537). Tokenizing a prompt takes microseconds.
        self._tokenizing = threading.Lock()

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> `[B, max_length, D]` in the encoder's dtype, zero past each prompt's tokens."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {prompts!r}")
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # its whole module for one function

        with self._tokenizing:
            tokens = self.tokenizer(
                [prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_length,
                truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = self.model.device
        mask = tokens.attention_mask.to(device)
        hidden = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        seq_lens = mask.gt(0).sum(dim=1)
        keep = torch.arange(self.max_length, device=device)[None, :] < seq_lens[:, None]
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))

    def empty_prompt_embedding(self) -> torch.Tensor:
        """The embedding of "" `[1, max_length, D]`: the negative prompt and the text-dropout target."""
        return self.encode([""])

    def save(self, folder_text_encoder: str | Path, folder_tokenizer: str | Path) -> None:
        """Write `text_encoder/` and `tokenizer/` folders in the released diffusers layout."""
        write_folder_atomically(folder_text_encoder, lambda tmp: self.model.save_pretrained(tmp))
        write_folder_atomically(folder_tokenizer, lambda tmp: self.tokenizer.save_pretrained(tmp))


def build_text_encoder(cfg: TextEncoderConfig, seed: int = 0, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> TextEncoder:
    """A randomly initialised UMT5 encoder of the given sizes (deterministic in `seed` on a given
    device) with the offline tiny tokenizer. Built on `device`: the real size (5.7 B) initialises
    in seconds on a GPU, minutes on a CPU."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                        num_layers=cfg.num_layers, num_heads=cfg.num_heads)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = UMT5EncoderModel(config)
    return TextEncoder(model.to(dtype), build_tokenizer(cfg.max_length), cfg.max_length)


def _require_folder(folder: Path, what: str, needed: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {what} folder does not exist")
    if not (folder / needed).is_file():
        raise FileNotFoundError(f"{folder / needed}: {what} {needed} is missing")


def load_text_encoder(folder_text_encoder: str | Path, folder_tokenizer: str | Path,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      max_length: int = 512) -> TextEncoder:
    """Load a `text_encoder/` (UMT5EncoderModel) and `tokenizer/` (T5) folder from local disk."""
    from transformers import T5TokenizerFast, UMT5EncoderModel

    folder_text_encoder, folder_tokenizer = Path(folder_text_encoder), Path(folder_tokenizer)
    _require_folder(folder_text_encoder, "text encoder", "config.json")
    _require_folder(folder_tokenizer, "tokenizer", "tokenizer_config.json")
    try:
        tokenizer = T5TokenizerFast.from_pretrained(folder_tokenizer, local_files_only=True)
    except Exception as e:  # re-raised naming the folder
        raise ValueError(f"{folder_tokenizer}: cannot load the tokenizer: {e}") from e
    try:
        model, info = UMT5EncoderModel.from_pretrained(
            folder_text_encoder, dtype=dtype, local_files_only=True, output_loading_info=True)
    except Exception as e:  # re-raised naming the folder
        raise ValueError(f"{folder_text_encoder}: cannot load the text encoder: {e}") from e
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(f"{k}: {v}" for k, v in problems.items())
        raise ValueError(f"{folder_text_encoder}: text encoder weights do not match its config.json ({listed})")
    return TextEncoder(model.to(device), tokenizer, max_length)
