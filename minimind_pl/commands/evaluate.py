"""``python main.py eval``: loss, perplexity and bits per byte on a jsonl, or multiple-choice accuracy.

The jsonl's format is read from its first line, by the data formats' one rule
(:func:`minimind_pl.data.formats.detect_format`), then as multiple choice:

- ``{"text": ...}`` (pretraining): every token after ``<|im_start|>`` is scored, as in pretraining;
- ``{"conversations": [...]}`` (SFT): the assistant turns are scored, with the SFT loss mask
  (rendered without the training-time augmentations, so the numbers are deterministic);
- image conversations (MiniMind-V), ``{"conversations": [...], "images": [...]}`` lines or a MiniMind-V Parquet
  file (``conversations``, ``image_bytes``): the assistant turns are scored as in SFT with the images in (each
  ``<image>`` expanded for the model's placeholder by the VLM data format's encoder, each image decoded and
  preprocessed as its tower says); image tokens are never scored. A file is image conversations when any of its
  records has an ``images`` field (a Parquet file always);
- ``{"question", "A", "B", ..., "answer"}`` (C-Eval / CMMLU style, a line of no data format): each choice is
  scored by its log-likelihood given the question, the best one is the model's answer, and accuracy is reported
  (plus ``acc_norm``, the log-likelihood per UTF-8 byte of the choice, which favours long choices less).

A line with both ``text`` and ``conversations`` is pretraining text, as it is to the data tools.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text (special tokens count no bytes), so
models with different tokenizers compare. Documents longer than ``seq_len`` are scored in consecutive
windows (each window starts a fresh context; a window takes the images whose placeholder runs it overlaps, and a
run it cuts takes an image's first features, the model's rule for a truncated run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch

from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.commands.tool_eval import tool_eval_command
from minimind_pl.commands.images import image_problem, read_image
from minimind_pl.commands.scoring import Scored, scored_logprobs
from minimind_pl.data.block_map import block_records
from minimind_pl.data.formats import detect_format, format_named
from minimind_pl.data.formats.vlm import IMAGES_FIELD, image_location, image_starts
from minimind_pl.data.jsonl import read_jsonl
from minimind_pl.data.parquet import is_parquet, parquet_blocks
from minimind_pl.errors import UserError, check_input_file
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.tools import Tool
from minimind_pl.vision.preprocess import ImageError

SCORED_FORMATS = ("pretrain", "sft", "vlm")  # the data formats whose documents carry a loss mask to score
IMAGE_FORMAT = "vlm"


def eval_command(
    ckpt: str | None = None,
    data: str | None = None,
    tokenizer: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    preset: str | None = None,
    lora: str | None = None,
    vision_encoder: str | None = None,
    seq_len: int = 1024,
    batch_size: int = 8,
    limit: int | None = None,
    mc_format: Literal["cloze", "letter"] = "cloze",
    chat: bool = False,
    device: str = "auto",
    inference_rope_scaling: bool = False,
    harness: str | None = None,
    harness_include: str | None = None,
    num_fewshot: int | None = None,
    task: Literal["tools"] | None = None,
    endpoint: str | None = None,
    endpoint_model: str = "minimind",
    api_key: str | None = None,
    tools: list[Tool] | None = None,
    max_turns: int = 3,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Evaluate a model on a jsonl file (LM metrics for text / conversations, accuracy for multiple choice), or on
    lm-evaluation-harness tasks (``--harness``).

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth or a Hugging Face directory.
        data: A jsonl file: pretraining ``text``, SFT ``conversations``, image conversations
            ``{"conversations", "images"}`` (image paths relative to the file) or multiple-choice questions
            ``{"question", "A", "B", "C", "D", "answer"}``; or a MiniMind-V Parquet file (image conversations).
        tokenizer: Tokenizer directory (default: the one recorded with the checkpoint).
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a MiniMind .pth (default: read from the tensor shapes).
        lora: A LoRA adapter file to apply on top of the weights.
        vision_encoder: The vision tower folder of a MiniMind-V checkpoint (default: the one its checkpoint
            recorded or holds); needed to score image conversations, not text.
        seq_len: Longest window scored at once (longer documents are split into windows).
        batch_size: Sequences per forward pass.
        limit: Evaluate only the first this many lines.
        mc_format: Multiple choice: ``cloze`` scores each choice's text after the question; ``letter``
            lists the choices in the prompt and scores the letters.
        chat: Multiple choice: wrap the question in the chat template (for SFT models).
        device: ``auto``, ``cpu`` or ``cuda``.
        inference_rope_scaling: YaRN RoPE scaling (MiniMind's settings) for texts beyond the trained length.
        harness: Instead of ``--data``: comma-separated lm-evaluation-harness tasks or groups (e.g.
            ``ceval-valid,cmmlu,arc_easy,hellaswag``; lm-eval downloads their data), run on this model and printed
            as lm-eval's table (needs the ``eval`` extra). ``--limit`` caps the documents per task, ``--batch_size``
            the sequences per forward pass, ``--seq_len`` the context, ``--chat true`` applies the chat template.
        harness_include: A folder of your own lm-eval task YAML files (lm-eval's include path).
        num_fewshot: Few-shot examples per prompt for ``--harness`` (default: each task's own).
        task: ``tools``: the tool-call benchmark on ``--data`` (MiniMind agent-RL rows with ``gt``; see
            ``commands.tool_eval``), scoring ``--ckpt`` or ``--endpoint``: task success, valid calls, calls per
            task and unfinished share, with 95% intervals.
        endpoint: ``--task tools`` against an OpenAI-compatible server (vLLM, SGLang, ``serve``) at this URL
            instead of a checkpoint.
        endpoint_model: The ``model`` named in requests to ``--endpoint``.
        api_key: The ``--endpoint``'s API key, if it asks for one.
        tools: ``--task tools``: tools of your own beside the built-in ones (a tool of the same name replaces a
            built-in one), each ``{"class_path": ..., "init_args": ...}`` naming a ``minimind_pl.tools.Tool``.
        max_turns: ``--task tools``: most replies per task (MiniMind's agent loop: 3).
        max_new_tokens: ``--task tools``: longest reply in tokens.
    """
    if task == "tools":
        if data is None:
            raise UserError("eval --task tools needs --data FILE (tool tasks, e.g. bench/tool_tasks.jsonl)")
        return tool_eval_command(data, ckpt, endpoint, lambda: checkpoint_and_tokenizer(
            ckpt, lora, preset, device, inference_rope_scaling, tokenizer, allow_tokenizer_mismatch), tools or (),
            max_turns, max_new_tokens, endpoint_model, api_key, limit)
    if ckpt is None:
        raise UserError("eval needs --ckpt (a checkpoint to evaluate)")
    if harness:
        return harness_command(ckpt, harness, harness_include, tokenizer, allow_tokenizer_mismatch, preset, lora,
                               seq_len, batch_size, limit, num_fewshot, chat, device)
    if data is None:
        raise UserError("eval needs --data FILE (a jsonl or Parquet file to score) or --harness TASKS")
    records = read_records(data, limit)  # bad data stops the command before the model loads
    kind = eval_format(records, data)
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True, device=device,  # adapters folded in: faster
                                   inference_rope_scaling=inference_rope_scaling, vision_encoder=vision_encoder)
    problem = image_problem(model) if kind == IMAGE_FORMAT and any(map(record_images, records)) else None
    if problem:
        raise UserError(f"{data} holds image conversations, and {problem}")
    tok = checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch)
    if kind == "choice":
        metrics = multiple_choice(model, tok, records, data, mc_format, chat, batch_size, seq_len)
        print(f"{data}: accuracy {metrics['accuracy']:.4f}  acc_norm {metrics['acc_norm']:.4f}  "
              f"({int(metrics['questions'])} questions)")
    else:
        metrics = language_modeling(model, tok, records, kind, data, batch_size, seq_len)
        print(f"{data}: loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  "
              f"bits/byte {metrics['bits_per_byte']:.4f}  ({int(metrics['tokens'])} tokens, "
              f"{int(metrics['bytes'])} bytes, {int(metrics['documents'])} documents)")
    return metrics


def checkpoint_and_tokenizer(ckpt: str, lora: str | None, preset: str | None, device: str,
                             inference_rope_scaling: bool, tokenizer: str | None,
                             allow_tokenizer_mismatch: bool) -> tuple[MiniMindForCausalLM, Tokenizer]:
    """A checkpoint's model (adapters merged) and tokenizer, for the commands that generate."""
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True, device=device, inference_rope_scaling=inference_rope_scaling)
    return model, checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch)


def harness_command(ckpt: str, tasks: str, include: str | None, tokenizer: str | None, allow_tokenizer_mismatch: bool,
                    preset: str | None, lora: str | None, seq_len: int, batch_size: int, limit: int | None,
                    num_fewshot: int | None, chat: bool, device: str) -> dict[str, Any]:
    """``eval --harness``: load the model and hand it to lm-evaluation-harness (``commands.harness``)."""
    from minimind_pl.commands.harness import import_lm_eval, run_harness, task_manager

    import_lm_eval()  # a missing extra stops the command before the model loads
    model, tok = checkpoint_and_tokenizer(ckpt, lora, preset, device, False, tokenizer, allow_tokenizer_mismatch)
    return run_harness(model, tok, tasks, task_manager(include), batch_size, seq_len, limit, num_fewshot, chat)


# ============================================================================ reading


def read_records(path: str, limit: Optional[int] = None) -> list[tuple[int, Any]]:
    """``(line number, record)`` of a jsonl file, or ``(row number, record)`` of a MiniMind-V Parquet file (the
    data code's Parquet source: image bytes in ``images``), the first ``limit`` of them."""
    if not is_parquet(check_input_file(path, "--data", "a .jsonl or .parquet file")):
        return list(read_jsonl(path, "--data", limit))
    records: list[tuple[int, Any]] = []
    for first_row, block, _ in parquet_blocks(path):
        found, errors, _ = block_records(first_row, block)
        if errors:
            raise UserError(f"{path}, row {errors[0][0]}: {errors[0][1]}; fix the row")
        records += found
        if limit is not None and len(records) >= limit:
            return records[:limit]
    return records


def eval_format(records: Sequence[tuple[int, Any]], path: str) -> str:
    """The name of the records' data format (``pretrain``, ``sft``, or ``vlm`` when any record has images), or
    ``choice`` for a multiple-choice question."""
    if not records:
        raise UserError(f"{path} (from --data) holds no records (the file is empty or blank); name a jsonl file")
    line_no, first = records[0]
    if any(isinstance(r, dict) and "conversations" in r and IMAGES_FIELD in r for _, r in records):
        return IMAGE_FORMAT  # a later line with images makes the whole file image conversations
    data_format = detect_format(first)
    if data_format is not None and data_format.name in SCORED_FORMATS:
        return data_format.name
    if data_format is None and isinstance(first, dict) and "question" in first and "answer" in first:
        return "choice"
    found = f"a {data_format.name} record, which eval does not score; " if data_format else ""
    raise UserError(f"{path}:{line_no}: cannot tell the format: {found}expected a 'text', 'conversations' or "
                    f"'question' + 'answer' record")


# ============================================================================ scoring


@dataclass(frozen=True)
class ImageSource:
    """One image of a scored document: what to decode (a file or encoded bytes) and where the data names it."""

    data: Path | bytes
    where: str

    def read(self, model: MiniMindForCausalLM) -> torch.Tensor:
        """(3, H, W) as ``model``'s tower reads it; a UserError naming the image when it is missing or broken."""
        try:
            return read_image(model, self.data)
        except FileNotFoundError:
            problem = "no such file"
        except (ImageError, OSError) as error:
            problem = str(error)
        raise UserError(f"{self.where}: {problem}")


def score_sequences(model: MiniMindForCausalLM, sequences: Sequence[Scored], batch_size: int = 8,
                    images: Optional[Sequence[Sequence[ImageSource]]] = None) -> list[float]:
    """Summed negative log-likelihood (nats) of the scored tokens of each sequence; ``images[i]``: sequence i's
    images in the order of its placeholder runs (decoded a batch at a time)."""
    return [nll for nll, _ in scored_logprobs(model, sequences, batch_size, images)]


def window_spans(length: int, seq_len: int) -> list[slice]:
    """Windows of at most ``seq_len + 1`` tokens over a sequence of ``length``, overlapping by one token, so every
    scored token is scored exactly once (the first token of a window is context only)."""
    if length <= seq_len + 1:
        return [slice(0, length)]
    return [slice(start, start + seq_len + 1) for start in range(0, length - 1, seq_len)]


def window_images(ids: Sequence[int], span: slice, images: Sequence[ImageSource], encoder: Any) -> list[ImageSource]:
    """The images whose tokens overlap the window ``span`` of ``ids`` (image k starts at the k-th of
    :func:`~minimind_pl.data.formats.vlm.image_starts`, the data's reading of the model's rule)."""
    if not images:
        return []
    length = encoder.image_token_len
    starts = image_starts(np.asarray(ids), encoder.image_token_id, length)
    stop = min(span.stop, len(ids))
    return [images[k] for k in np.flatnonzero((starts < stop) & (starts + length > span.start))]


def scored_bytes(tokenizer: Tokenizer, ids: Sequence[int], scored: Sequence[int]) -> int:
    """UTF-8 bytes of the text the scored tokens stand for (special tokens count none)."""
    return sum(len(tokenizer.token_bytes(t)) for t, s in zip(ids, scored) if s and not tokenizer.is_special(t))


# ============================================================================ language modelling


def record_images(record: tuple[int, Any]) -> list:
    """The images a ``(line, record)`` pair lists (none for a record without an ``images`` field)."""
    return list(record[1].get(IMAGES_FIELD) or []) if isinstance(record[1], dict) else []


def document_encoder(model: MiniMindForCausalLM, tokenizer: Tokenizer, kind: str) -> Any:
    """The training data's encoder of ``kind`` without its random augmentations; for image conversations, with
    the model's placeholder token and features per image."""
    vision = getattr(model, "vision_config", None)
    image = {"image_token": vision.image_token, "image_token_len": vision.image_token_len} if (
        kind == IMAGE_FORMAT and vision is not None) else {}
    return format_named(kind, "kind").encoder(tokenizer, augment=False, **image)


def encode_documents(encoder: Any, records: Sequence[tuple[int, Any]],
                     path: str) -> tuple[list[Scored], list[list[ImageSource]]]:
    """Token ids and scored-token masks of every record, as the training data modules build them, and each
    record's images (none for text)."""
    docs, images, parquet = [], [], is_parquet(path)
    for (line_no, _), result in zip(records, encoder.encode_records(records)):
        if isinstance(result, str):
            raise UserError(f"{path}:{line_no}: {result}")
        ids, mask, *stored = result[0]  # an image format's documents carry their images' references
        ids = np.asarray(ids).tolist()
        docs.append((ids, [0] + [1] * (len(ids) - 1) if mask is None else np.asarray(mask).tolist()))
        where = f"{path}, {'row' if parquet else 'line'} {line_no}: image"
        images.append([ImageSource(image_location(path, reference, not parquet), f"{where} {j + 1}")
                       for j, reference in enumerate(stored[0] if stored else [])])
    return docs, images


def language_modeling(model: MiniMindForCausalLM, tokenizer: Tokenizer, records: Sequence[tuple[int, Any]],
                      kind: str, path: str, batch_size: int = 8, seq_len: int = 1024) -> dict[str, float]:
    """Mean loss (nats per scored token), perplexity and bits per byte over all documents (image documents with
    their images)."""
    seq_len = min(seq_len, model.config.max_position_embeddings - 1)
    encoder = document_encoder(model, tokenizer, kind)
    docs, images = encode_documents(encoder, records, path)
    pieces, piece_images = [], []
    for (ids, scored), sources in zip(docs, images):
        for span in window_spans(len(ids), seq_len):
            pieces.append((ids[span], [0] + scored[span][1:]))  # a window's first token is context only
            piece_images.append(window_images(ids, span, sources, encoder))
    nats = sum(score_sequences(model, pieces, batch_size, piece_images if any(piece_images) else None))
    tokens = sum(sum(scored[1:]) for _, scored in pieces)
    num_bytes = sum(scored_bytes(tokenizer, ids, scored) for ids, scored in pieces)
    loss = nats / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nats / math.log(2) / max(num_bytes, 1),
            "tokens": float(tokens), "bytes": float(num_bytes), "documents": float(len(docs))}


# ============================================================================ multiple choice


def choice_letters(record: dict[str, Any]) -> list[str]:
    """The choice keys of a record: single capital letters, in order (A, B, C, D, ...)."""
    return sorted(k for k in record if len(k) == 1 and k.isupper() and isinstance(record[k], (str, int, float)))


def choice_prompts(record: dict[str, Any], letters: list[str], mc_format: str) -> tuple[str, list[str]]:
    """The question prompt and the continuation scored for each choice."""
    question = str(record["question"]).strip()
    if mc_format == "letter":
        options = "\n".join(f"{k}. {record[k]}" for k in letters)
        return f"{question}\n{options}\n答案：", letters
    if mc_format != "cloze":
        raise UserError(f"unknown mc_format {mc_format!r}; use 'cloze' or 'letter'")
    return f"{question}\n答案：", [str(record[k]) for k in letters]


def multiple_choice(model: MiniMindForCausalLM, tokenizer: Tokenizer, records: Sequence[tuple[int, Any]], path: str,
                    mc_format: str = "cloze", chat: bool = False, batch_size: int = 8,
                    seq_len: int = 1024) -> dict[str, float]:
    """Accuracy (highest total log-likelihood) and acc_norm (highest log-likelihood per byte)."""
    seq_len = min(seq_len, model.config.max_position_embeddings)
    sequences, spans, answers, lengths = [], [], [], []
    for line_no, record in records:
        letters = _checked_choices(record, f"{path}:{line_no}")
        prompt, continuations = choice_prompts(record, letters, mc_format)
        if chat:
            prompt_ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        else:
            prompt_ids = tokenizer.encode(prompt)
        spans.append((len(sequences), len(continuations)))
        answers.append(letters.index(str(record["answer"]).strip()))
        for text in continuations:
            cont = tokenizer.encode(text)
            ids = (prompt_ids + cont)[-seq_len:]  # the prompt is cut from the left if it must be
            sequences.append((ids, [0] * (len(ids) - len(cont)) + [1] * len(cont)))
            lengths.append(max(len(text.encode("utf-8")), 1))
    nll = score_sequences(model, sequences, batch_size)
    correct = correct_norm = 0
    for (start, count), answer in zip(spans, answers):
        scores = [-nll[start + j] for j in range(count)]
        correct += int(np.argmax(scores)) == answer
        correct_norm += int(np.argmax([s / lengths[start + j] for j, s in enumerate(scores)])) == answer
    n = max(len(answers), 1)
    return {"accuracy": correct / n, "acc_norm": correct_norm / n, "questions": float(len(answers))}


def _checked_choices(record: Any, where: str) -> list[str]:
    """The record's choice letters; UserError naming the line if it is not a usable question."""
    if not isinstance(record, dict) or "question" not in record or "answer" not in record:
        raise UserError(f"{where}: expected a multiple-choice record with 'question' and 'answer'")
    letters = choice_letters(record)
    if len(letters) < 2:
        raise UserError(f"{where}: a question needs at least two choices (keys 'A', 'B', ...)")
    if str(record["answer"]).strip() not in letters:
        raise UserError(f"{where}: answer {record['answer']!r} is not one of the choices {letters}")
    return letters
