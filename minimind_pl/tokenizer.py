"""Tokenizer for minimind_pl: Hugging Face tokenizer directories read with the `tokenizers` library.

A tokenizer directory holds ``tokenizer.json`` (the `tokenizers` model) and ``tokenizer_config.json``
(special tokens and the Jinja chat template): the layout MiniMind and Hugging Face use. MiniMind's own
tokenizer loads unchanged. Chat templates render through :mod:`minimind_pl.chat_format`, exactly as
``transformers`` renders them; :meth:`Tokenizer.encode_chat` turns a conversation into token ids.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimind_pl.chat_format import CHAT_TEMPLATE, TURN_END, TURN_START, render_chat, select_template
from minimind_pl.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# MiniMind's added tokens, in id order 0..35. The first 21 are "special" (skipped by
# skip_special_tokens); the tool/think/buffer tokens after them are plain added tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
]
CONTROL_TOKENS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
] + [f"<|buffer{i}|>" for i in range(1, 10)]
ADDED_TOKENS = SPECIAL_TOKENS + CONTROL_TOKENS
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", TURN_START, TURN_END


# ====================================================================== helpers
def _byte_decoder() -> dict[str, int]:
    """Map each character of the GPT-2 byte-level alphabet back to the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()


def _read_text(path: Path) -> str:
    """Read a UTF-8 JSON file, checking that it parses; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (a tokenizer folder holds {TOKENIZER_FILE} and "
                                f"{CONFIG_FILE}: copy both from where the tokenizer was made)")
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return text


def _token_content(value: Any) -> Optional[str]:
    """Text of a special-token entry: a string or an AddedToken-like dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


# ====================================================================== Tokenizer
class Tokenizer:
    """Byte-level BPE tokenizer with MiniMind's special tokens and chat template.

    Build it with :meth:`from_file` (or :func:`train_tokenizer`). It pickles by its JSON text,
    so DataLoader workers get their own copy.
    """

    def __init__(self, tokenizer_json: str, config_json: str) -> None:
        """Wrap the texts of ``tokenizer.json`` and ``tokenizer_config.json``.

        Args:
            tokenizer_json: the text of ``tokenizer.json``.
            config_json: the text of ``tokenizer_config.json``.
        """
        self._json = tokenizer_json
        self._config_json = config_json
        self._config = json.loads(config_json)
        try:
            self._tok = _HFTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the library raises a bare Exception
            raise UserError(f"invalid {TOKENIZER_FILE}: {exc}") from exc
        digest = hashlib.sha256(tokenizer_json.encode("utf-8") + config_json.encode("utf-8"))
        self._fingerprint = digest.hexdigest()
        self._byte_level = (json.loads(tokenizer_json).get("decoder") or {}).get("type") == "ByteLevel"
        self._id_bytes: Optional[list[bytes]] = None
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # ------------------------------------------------------------------ load / save / pickle
    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).

        Raises FileNotFoundError for a missing directory or file, ValueError for corrupt JSON.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {root} (a tokenizer is a folder with {TOKENIZER_FILE} "
                                    f"and {CONFIG_FILE}: MiniMind's model/ folder, or one made by python main.py tokenizer)")
        return cls(_read_text(root / TOKENIZER_FILE), _read_text(root / CONFIG_FILE))

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (byte-identical) into ``path``."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / TOKENIZER_FILE).write_bytes(self._json.encode("utf-8"))
        (root / CONFIG_FILE).write_bytes(self._config_json.encode("utf-8"))
        return root

    def __getstate__(self) -> dict:
        """Pickle by the two JSON texts only."""
        return {"json": self._json, "config": self._config_json}

    def __setstate__(self, state: dict) -> None:
        """Rebuild from :meth:`__getstate__` output."""
        self.__init__(state["json"], state["config"])

    def __repr__(self) -> str:
        """Short description: vocabulary size and fingerprint prefix."""
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, key: str, default: str) -> int:
        """Id of the special token named by config ``key`` (falling back to ``default``)."""
        text = _token_content(self._config.get(key)) or default
        tid = self._tok.token_to_id(text)
        if tid is None:
            raise UserError(f"{key} {text!r} is not in the vocabulary")
        return tid

    @property
    def bos_id(self) -> int:
        """Id of the begin-of-turn token (``<|im_start|>`` = 1 for MiniMind)."""
        return self._special_id("bos_token", BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        """Id of the end-of-turn token (``<|im_end|>`` = 2 for MiniMind)."""
        return self._special_id("eos_token", EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        """Id of the padding token (``<|endoftext|>`` = 0 for MiniMind)."""
        return self._special_id("pad_token", PAD_TOKEN)

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the tokenizer.json + tokenizer_config.json bytes."""
        return self._fingerprint

    @property
    def vocabulary_fingerprint(self) -> str:
        """sha256 of what decides the token ids (``tokenizer.json``'s content, not its formatting, not the chat
        template): checkpoints record it, so a model is never paired with a tokenizer whose ids mean other text."""
        canonical = json.dumps(json.loads(self._json), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def definition(self) -> dict:
        """The parsed ``tokenizer.json`` (model, vocabulary, merges, added tokens, pre-tokenizer), read-only use."""
        return json.loads(self._json)

    @property
    def config(self) -> dict:
        """The parsed ``tokenizer_config.json`` (treat as read-only)."""
        return self._config

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens from the config (``bos_token``, ``eos_token``, ...), as template variables."""
        named = {k: _token_content(v) for k, v in self._config.items() if k.endswith("_token")}
        return {k: v for k, v in named.items() if isinstance(v, str)}

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; nothing is added (special tokens written in the text are kept)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """``<bos>`` and the ids of ``text``: how pretraining saw the start of a document (a prompt to continue)."""
        return [self.bos_id] + self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the `tokenizers` library."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """Texts of many id lists."""
        return self._tok.decode_batch([list(b) for b in batch], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """Token string of an id, or None if out of range."""
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special added token (dropped by ``skip_special_tokens``)."""
        return token_id in self._special_ids

    # ------------------------------------------------------------------ chat template
    def chat_template(self, tools: Any = None) -> str:
        """The Jinja chat template source (the ``tool_use`` one of a named set when tools are given)."""
        return select_template(self._config.get("chat_template"), tools, CONFIG_FILE)

    def apply_chat_template(self, messages: Sequence[Mapping], tools: Optional[list] = None,
                            add_generation_prompt: bool = False, open_thinking: bool = False,
                            **template_vars: Any) -> str:
        """Render a conversation with the tokenizer's chat template, exactly as transformers would.

        Args:
            messages: dicts with ``role`` (system/user/assistant/tool) and ``content``; optional
                ``reasoning_content``, ``tools`` (system; list or JSON string) and ``tool_calls``
                (assistant; list or JSON string).
            tools: tool JSON schemas (list or JSON string); default: the system message's ``tools``.
            add_generation_prompt: append the assistant header to prompt a reply.
            open_thinking: with ``add_generation_prompt``, leave a ``<think>`` block open for the model.
            **template_vars: extra variables for the template.

        Raises ValueError naming the message index and role for bad messages, or the template error.
        """
        return render_chat(self._config.get("chat_template"), messages, tools, add_generation_prompt=add_generation_prompt,
                           open_thinking=open_thinking, **{**self.special_tokens_map, **template_vars})

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                    open_thinking: bool = False, tools: Optional[list] = None) -> list[int]:
        """Token ids of a conversation rendered with the chat template (by default ready for the reply).

        Args:
            messages: the conversation (see :meth:`apply_chat_template`).
            add_generation_prompt: end with the assistant header, so the model writes the next turn.
            open_thinking: leave a ``<think>`` block open for the model to reason in first.
            tools: tool JSON schemas; default: the system message's ``tools``.
        """
        return self.encode(self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                    open_thinking=open_thinking))

    # ------------------------------------------------------------------ streaming
    def token_bytes(self, token_id: int) -> bytes:
        """Raw UTF-8 bytes a token stands for (byte-level tokenizers; added tokens are their text)."""
        if self._id_bytes is None:
            self._id_bytes = self._build_id_bytes()
        if not 0 <= token_id < len(self._id_bytes):
            raise UserError(f"token id {token_id} is outside the vocabulary (0..{len(self._id_bytes) - 1})")
        return self._id_bytes[token_id]

    def _build_id_bytes(self) -> list[bytes]:
        """Table id -> bytes."""
        table = [b""] * self.vocab_size
        added = {tid: tok.content for tid, tok in self._tok.get_added_tokens_decoder().items()}
        for token, tid in self._tok.get_vocab(with_added_tokens=True).items():
            if tid in added:
                table[tid] = added[tid].encode("utf-8")
            else:
                table[tid] = bytes(_BYTE_DECODER[ch] for ch in token if ch in _BYTE_DECODER)
        return table

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A decoder for token-by-token output that never emits a broken character."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns only the text completed by that token.

    Bytes of an unfinished UTF-8 character are held until the character completes, so a
    multi-byte character split over tokens is never emitted as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        """Args:
            tokenizer: the Tokenizer whose ids are pushed.
            skip_special_tokens: drop special tokens (``<|im_end|>``, ...) from the output.
        """
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (possibly '')."""
        if self._skip and self._tok.is_special(token_id):
            return ""
        if self._tok._byte_level:
            return self._utf8.decode(self._tok.token_bytes(token_id))
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        return "" if text.endswith("\ufffd") else self._take(text)

    def _take(self, text: str) -> str:
        """Return the part of ``text`` not emitted yet (generic, non byte-level path)."""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def flush(self) -> str:
        """Return text still held back; an unfinished character becomes U+FFFD."""
        if self._tok._byte_level:
            return self._utf8.decode(b"", final=True)
        return self._take(self._tok.decode(self._ids))


# ====================================================================== training
def _added_tokens_config() -> dict[str, dict]:
    """``added_tokens_decoder`` entries for MiniMind's 36 added tokens."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {str(i): {"content": tok, **flags, "special": tok in SPECIAL_TOKENS}
            for i, tok in enumerate(ADDED_TOKENS)}


def tokenizer_config(chat_template: str = CHAT_TEMPLATE, model_max_length: int = 131072) -> dict:
    """The ``tokenizer_config.json`` contents for a MiniMind-layout tokenizer."""
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_config(),
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": BOS_TOKEN, "clean_up_tokenization_spaces": False, "eos_token": EOS_TOKEN,
        "legacy": True, "model_max_length": model_max_length, "pad_token": PAD_TOKEN,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": PAD_TOKEN,
        "chat_template": chat_template,
    }


def _build_bpe(vocab_size: int, show_progress: bool) -> tuple[_HFTokenizer, trainers.BpeTrainer]:
    """An empty byte-level BPE tokenizer and its trainer, set up as MiniMind does."""
    minimum = len(ADDED_TOKENS) + 256
    if vocab_size < minimum:
        raise UserError(f"vocab_size must be at least {minimum} (added tokens + 256 bytes), got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=ADDED_TOKENS,
                                  show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def _mark_control_tokens(tokenizer_json: str) -> str:
    """Make the tool/think/buffer tokens plain (non-special) added tokens, as in MiniMind's file."""
    data = json.loads(tokenizer_json)
    for entry in data.get("added_tokens", []):
        if entry["content"] in CONTROL_TOKENS:
            entry["special"] = False
    return json.dumps(data, ensure_ascii=False, indent=2)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                    show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on texts the way MiniMind does and save it.

    Args:
        texts: the training texts, streamed (the texts of jsonl files of any data format:
            ``minimind_pl.data.formats.jsonl_texts(files)``).
        vocab_size: final vocabulary size, MiniMind's 36 added tokens included (ids 0..35).
        out_dir: directory that receives ``tokenizer.json`` + ``tokenizer_config.json``.
        show_progress: show the `tokenizers` library's progress bar.

    Returns the trained :class:`Tokenizer`, loaded back from ``out_dir``.
    """
    if isinstance(texts, (str, Path)):
        raise TypeError("train_tokenizer takes an iterable of texts, not a path; read jsonl files with "
                        "minimind_pl.data.formats.jsonl_texts(files)")
    tok, trainer = _build_bpe(vocab_size, show_progress)
    tok.train_from_iterator(_only_texts(texts), trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    for i, token in enumerate(ADDED_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"added token {token!r} did not get id {i}")
    config = json.dumps(tokenizer_config(), ensure_ascii=False, indent=2)
    tokenizer = Tokenizer(_mark_control_tokens(tok.to_str()), config)
    tokenizer.save(out_dir)
    return Tokenizer.from_file(out_dir)


def _only_texts(texts: Iterable[str]) -> Iterator[str]:
    """``texts``, refusing anything that is not a string (a list of file paths is a mistake, not a corpus)."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer takes texts, got a {type(text).__name__}; read jsonl files with "
                            "minimind_pl.data.formats.jsonl_texts(files)")
        yield text


def chars_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Characters per token of ``tokenizer`` over ``texts`` (higher = better compression)."""
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(list(texts)))
    return sum(len(t) for t in texts) / max(tokens, 1)
