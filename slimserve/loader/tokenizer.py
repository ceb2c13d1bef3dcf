"""A `tokenizers` fast tokenizer built from the model's own files, plus its chat template."""

from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer
from tokenizers.decoders import DecodeStream

from slimserve.errors import InvalidRequest, ModelLoadError, UnsupportedModel

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`; they are the ones llama.cpp applies.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_bytes():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt-2": _byte_level,
    "smollm": _digits_then_bytes,
    "starcoder": _digits_then_bytes,
    "refact": _digits_then_bytes,
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}

# Token texts that end a turn in common chat formats; treated as end-of-generation when present.
END_OF_TURN_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
)

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Encode, decode and render chat prompts the way the model's own tokenizer does."""

    def __init__(
        self,
        fast: FastTokenizer,
        *,
        bos_id: int | None,
        eos_ids: set[int],
        add_bos: bool,
        chat_template: str | None,
    ):
        self.fast = fast
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.fast.id_to_token(token_id)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, source) -> Tokenizer:
        kind = source.meta("tokenizer.ggml.model")
        tokens = source.meta("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{source.path} has no tokenizer.ggml.tokens vocabulary")
        types = source.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            fast, tokens = _byte_level_bpe(source, tokens), list(tokens)
        elif kind == "llama":
            fast, tokens = _sentencepiece_bpe(source, tokens, types)
        else:
            raise UnsupportedModel(
                f"GGUF tokenizer type {kind!r} is not supported yet (byte-level BPE 'gpt2' and "
                "SentencePiece 'llama' are); load the model from its Hugging Face directory"
            )
        vocab = {t: i for i, t in enumerate(tokens)}
        added = [
            # a run of spaces is spelled with U+2581 (see _sentencepiece_bpe): it matches the
            # normalized text
            AddedToken(tok, special=typ == _CONTROL, normalized=SPACE in tok)
            for tok, typ in zip(tokens, types)
            if typ in (_CONTROL, _USER_DEFINED)
        ]
        fast.add_tokens([a for a in added if not a.special])
        fast.add_special_tokens([a for a in added if a.special])
        eos_ids = {
            source.meta("tokenizer.ggml.eos_token_id"),
            source.meta("tokenizer.ggml.eot_token_id"),
        }
        eos_ids |= {
            vocab[t] for t in END_OF_TURN_TEXTS if t in vocab and types[vocab[t]] == _CONTROL
        }
        eos_ids.discard(None)
        return cls(
            fast,
            bos_id=source.meta("tokenizer.ggml.bos_token_id"),
            eos_ids={int(i) for i in eos_ids},
            add_bos=bool(source.meta("tokenizer.ggml.add_bos_token", False)),
            chat_template=source.meta("tokenizer.chat_template"),
        )

    def to_dict(self) -> dict:
        """Everything the tokenizer is, as JSON-able values (the artifact cache keeps it)."""
        return {
            "tokenizer": self.fast.to_str(),
            "bos_id": self.bos_id,
            "eos_ids": sorted(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        return cls(
            FastTokenizer.from_str(d["tokenizer"]),
            bos_id=d["bos_id"],
            eos_ids=set(d["eos_ids"]),
            add_bos=d["add_bos"],
            chat_template=d["chat_template"],
        )

    @classmethod
    def from_hf_dir(cls, path: str, eos_from_config: list[int]) -> Tokenizer:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise ModelLoadError(f"{path} has no tokenizer.json")
        try:
            fast = FastTokenizer.from_file(tj)
        except Exception as e:
            raise ModelLoadError(f"{tj} is not a valid tokenizer file: {e}") from e
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        template = cfg.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()

        def token_id(key):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return fast.token_to_id(tok) if tok else None

        eos_ids = set(eos_from_config) | {token_id("eos_token")}
        eos_ids.discard(None)
        # The post-processor of tokenizer.json adds BOS when the model wants it; do not add twice.
        return cls(
            fast,
            bos_id=token_id("bos_token"),
            eos_ids=eos_ids,
            add_bos=False,
            chat_template=template,
        )

    # -- encode / decode ----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.fast.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)

    def compile_template(self) -> None:
        """Compile the chat template now (~90 ms with jinja's import, once): a server does it at
        startup, so its first chat does not pay for it."""
        if self._template is None and self.chat_template:
            self._template = _jinja_env().from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        if not self.chat_template:
            raise InvalidRequest("this model has no chat template; send a raw prompt instead")
        _check_messages(messages)
        self.compile_template()
        bos = self.token_text(self.bos_id) if self.bos_id is not None else ""
        eos = self.token_text(min(self.eos_ids)) if self.eos_ids else ""
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            **kwargs,
        )

    def detokenizer(self, skip_special_tokens: bool = True) -> DecodeStream:
        """A stream decoder that only emits text once its UTF-8 bytes are complete."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)


def _byte_level_bpe(source, tokens: list[str]) -> FastTokenizer:
    """GPT-2-style byte-level BPE: the file's merges, a pre-tokenizer regex by `ggml.pre`."""
    pre = source.meta("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModel(f"GGUF pre-tokenizer {pre!r} is not supported yet")
    merges = [tuple(m.split(" ", 1)) for m in source.meta("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    fast.pre_tokenizer = PRE_TOKENIZERS[pre]()
    fast.decoder = decoders.ByteLevel()
    return fast


SPACE = "\u2581"  # SentencePiece's visible space
_NORMAL = 1


def _sentencepiece_bpe(source, tokens: list[str], types: list[int]):
    """A SentencePiece BPE vocabulary (Gemma, Llama 2, Mistral GGUF files) as a `tokenizers` BPE.

    SentencePiece replaces spaces with U+2581 and then, at each step, merges the adjacent pair of
    pieces whose union is the vocabulary's best-scored piece; characters without a piece fall
    back to their UTF-8 bytes (<0xNN>). A BPE whose merges are every split of every piece into
    two pieces, ranked by the union's score, makes the same choices. The files carry no merges,
    so they are derived here. Returns the tokenizer and the vocabulary as it is spelled in it:
    Gemma files store runs of spaces as real spaces, which the normalized text never holds."""
    if source.meta("tokenizer.ggml.merges"):
        raise UnsupportedModel("a SentencePiece GGUF vocabulary with explicit merges")
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    scores = source.meta("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ != _NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            a, b = vocab.get(left), vocab.get(right)
            if a is not None and b is not None and types[a] == types[b] == _NORMAL:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = source.meta("tokenizer.ggml.unknown_token_id")
    fast = FastTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = source.meta("tokenizer.ggml.add_space_prefix", True)
    if prefix:  # a space before the text unless it starts with one (as transformers reads it)
        fast.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, "first", split=False)
    else:
        fast.normalizer = normalizers.Replace(" ", SPACE)
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    fast.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return fast, tokens


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str):
            raise InvalidRequest(
                f"messages[{i}] must have a 'role' and string 'content'", param="messages"
            )


def _raise(message: str):
    raise InvalidRequest(f"chat template error: {message}")


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
