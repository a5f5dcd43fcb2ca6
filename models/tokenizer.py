"""Tokenizers (the `tokenizers` package) from `tokenizer.json` or GGUF metadata, and chat templates."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

from hata_jax.models.gguf_loader import metadata

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> the regex that splits words before BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # digits one by one, then GPT-2's split
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
CONTROL_TOKEN = 3  # llama.cpp token type of special tokens such as <|im_end|>


@dataclasses.dataclass
class Tokenizer:
    """Text <-> token ids, with the model's special tokens and chat template.

    Attributes:
      backend: a `tokenizers.Tokenizer`; its post-processor adds BOS where the model wants it.
      bos_id: the BOS token id or None.
      stop_ids: ids that end generation (EOS, end of turn).
      chat_template: a Jinja2 chat template (HF convention) or None.
    """

    backend: object
    bos_id: int | None
    stop_ids: tuple[int, ...]
    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` lets the post-processor add BOS (a chat
        template writes its own)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]), ready for the assistant's turn."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; generate from a plain prompt (--no-chat)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        token = self.backend.id_to_token
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=token(self.bos_id) if self.bos_id is not None else "",
            eos_token=token(self.stop_ids[0]) if self.stop_ids else "",
        )

    def encode_prompt(self, text: str, chat: bool) -> list[int]:
        """Token ids of a user prompt, wrapped in the chat template when `chat`."""
        if chat:
            text = self.render_chat([{"role": "user", "content": text}])
        ids = self.encode(text, add_special_tokens=not chat)
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """From a GGUF file's metadata: byte-level BPE (`tokenizer.ggml.model` "gpt2")."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend

        kind = metadata(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is "
                             "supported; use the model's HF directory with tokenizer.json instead")
        tokens = metadata(reader, "tokenizer.ggml.tokens")
        merges = metadata(reader, "tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                     fuse_unk=False, byte_fallback=False))
        pre = metadata(reader, "tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_SPLITS:
            warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}: splitting words as GPT-2 does (tokens may "
                          "differ from the original tokenizer's)", stacklevel=2)
        splits = PRE_TOKENIZER_SPLITS.get(pre, (_GPT2_SPLIT,))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        types = metadata(reader, "tokenizer.ggml.token_type") or []
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t == CONTROL_TOKEN])
        bos = metadata(reader, "tokenizer.ggml.bos_token_id")
        if bos is not None and metadata(reader, "tokenizer.ggml.add_bos_token", False):
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
        stops = [metadata(reader, key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return cls(
            backend=backend,
            bos_id=bos,
            stop_ids=tuple(dict.fromkeys(s for s in stops if s is not None)),
            chat_template=metadata(reader, "tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | pathlib.Path) -> Tokenizer:
        """From `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json` when present)."""
        from tokenizers import Tokenizer as Backend

        directory = pathlib.Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{directory} has no tokenizer.json (only fast tokenizers are supported)")
        backend = Backend.from_file(str(path))
        cfg = _read_json(directory / "tokenizer_config.json")
        gen = _read_json(directory / "generation_config.json")
        model_cfg = _read_json(directory / "config.json")

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return None if value is None else backend.token_to_id(value)

        bos = token_id(cfg.get("bos_token"))
        if bos is None:
            bos = model_cfg.get("bos_token_id")
        stops = []
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id"), token_id(cfg.get("eos_token"))):
            stops += source if isinstance(source, list) else [source]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend=backend,
            bos_id=bos,
            stop_ids=tuple(dict.fromkeys(s for s in stops if s is not None)),
            chat_template=template,
        )


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
