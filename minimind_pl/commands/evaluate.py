"""``python main.py eval``: loss, perplexity and bits per byte on a jsonl, or multiple-choice accuracy.

The jsonl's format is read from its first line, by the data formats' one rule
(:func:`minimind_pl.data.formats.detect_format`), then as multiple choice:

- ``{"text": ...}`` (pretraining): every token after ``<|im_start|>`` is scored, as in pretraining;
- ``{"conversations": [...]}`` (SFT): the assistant turns are scored, with the SFT loss mask
  (rendered without the training-time augmentations, so the numbers are deterministic);
- ``{"question", "A", "B", ..., "answer"}`` (C-Eval / CMMLU style, a line of no data format): each choice is
  scored by its log-likelihood given the question, the best one is the model's answer, and accuracy is reported
  (plus ``acc_norm``, the log-likelihood per UTF-8 byte of the choice, which favours long choices less).

A line with both ``text`` and ``conversations`` is pretraining text, as it is to the data tools.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text (special tokens count no bytes), so
models with different tokenizers compare. Documents longer than ``seq_len`` are scored in consecutive
windows (each window starts a fresh context).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.data.formats import detect_format, format_named
from minimind_pl.data.jsonl import read_jsonl
from minimind_pl.errors import UserError
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer

Scored = tuple[list[int], list[int]]  # token ids, 1 where the token is scored (predicted from the ones before)
SCORED_FORMATS = ("pretrain", "sft")  # the data formats whose documents carry a loss mask to score


def eval_command(
    ckpt: str,
    data: str,
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
) -> dict[str, float]:
    """Evaluate a model on a jsonl file: LM metrics for text / conversations, accuracy for multiple choice.

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth or a Hugging Face directory.
        data: A jsonl file: pretraining ``text``, SFT ``conversations``, or multiple-choice questions
            ``{"question", "A", "B", "C", "D", "answer"}``.
        tokenizer: Tokenizer directory (default: the one recorded with the checkpoint).
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a MiniMind .pth (default: read from the tensor shapes).
        lora: A LoRA adapter file to apply on top of the weights.
        vision_encoder: The vision tower folder of a MiniMind-V checkpoint (default: the one its stage checkpoint
            recorded); its language side is scored on text data.
        seq_len: Longest window scored at once (longer documents are split into windows).
        batch_size: Sequences per forward pass.
        limit: Evaluate only the first this many lines.
        mc_format: Multiple choice: ``cloze`` scores each choice's text after the question; ``letter``
            lists the choices in the prompt and scores the letters.
        chat: Multiple choice: wrap the question in the chat template (for SFT models).
        device: ``auto``, ``cpu`` or ``cuda``.
        inference_rope_scaling: YaRN RoPE scaling (MiniMind's settings) for texts beyond the trained length.
    """
    records = list(read_jsonl(data, "--data", limit))  # bad data stops the command before the model loads
    kind = eval_format(records, data)
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, merge=True, device=device,  # adapters folded in: faster
                                   inference_rope_scaling=inference_rope_scaling, vision_encoder=vision_encoder)
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


# ============================================================================ reading


def eval_format(records: Sequence[tuple[int, Any]], path: str) -> str:
    """The name of the first record's data format (``pretrain`` or ``sft``), or ``choice`` for a multiple-choice
    question."""
    if not records:
        raise UserError(f"{path} (from --data) holds no records (the file is empty or blank); name a jsonl file")
    line_no, first = records[0]
    if isinstance(first, dict) and first.get("images"):
        raise UserError(f"{path}:{line_no}: image conversations: eval does not score them yet (the loss of a "
                        "vision-language validation file is not implemented in eval yet)")
    data_format = detect_format(first)
    if data_format is not None and data_format.name in SCORED_FORMATS:
        return data_format.name
    if data_format is None and isinstance(first, dict) and "question" in first and "answer" in first:
        return "choice"
    found = f"a {data_format.name} record, which eval does not score; " if data_format else ""
    raise UserError(f"{path}:{line_no}: cannot tell the format: {found}expected a 'text', 'conversations' or "
                    f"'question' + 'answer' record")


# ============================================================================ scoring


def score_sequences(model: MiniMindForCausalLM, sequences: Sequence[Scored], batch_size: int = 8) -> list[float]:
    """Summed negative log-likelihood (nats) of the scored tokens of each sequence."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))  # similar lengths share a batch
    totals = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = _pad([sequences[i] for i in chunk], device)
        with torch.inference_mode():
            logits = model(ids[:, :-1]).logits.float()  # (B, T-1, V): position t predicts token t+1
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        sums = (nll * mask[:, 1:]).sum(dim=1).tolist()
        for i, value in zip(chunk, sums):
            totals[i] = value
    return totals


def _pad(batch: Sequence[Scored], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and float mask tensors (padding is never scored, and causality hides it)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width)
    for row, (seq, scored) in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = torch.tensor(scored, dtype=torch.float32)
    return ids.to(device), mask.to(device)


def windows(ids: Sequence[int], scored: Sequence[int], seq_len: int) -> list[Scored]:
    """Split a long sequence into windows of at most ``seq_len + 1`` tokens overlapping by one token,
    so every scored token is scored exactly once (the first token of a window is context only)."""
    if len(ids) <= seq_len + 1:
        return [(list(ids), [0] + list(scored[1:]))]
    out = []
    for start in range(0, len(ids) - 1, seq_len):
        piece = slice(start, start + seq_len + 1)
        out.append((list(ids[piece]), [0] + list(scored[piece][1:])))
    return out


def scored_bytes(tokenizer: Tokenizer, ids: Sequence[int], scored: Sequence[int]) -> int:
    """UTF-8 bytes of the text the scored tokens stand for (special tokens count none)."""
    return sum(len(tokenizer.token_bytes(t)) for t, s in zip(ids, scored) if s and not tokenizer.is_special(t))


# ============================================================================ language modelling


def encode_documents(tokenizer: Tokenizer, records: Sequence[tuple[int, Any]], kind: str,
                     path: str) -> list[Scored]:
    """Token ids and scored-token masks of every record, as the training data modules build them (without their
    random augmentations)."""
    encoder = format_named(kind, "kind").encoder(tokenizer, augment=False)
    docs = []
    for (line_no, _), result in zip(records, encoder.encode_records(records)):
        if isinstance(result, str):
            raise UserError(f"{path}:{line_no}: {result}")
        ids, mask = result[0]
        ids = np.asarray(ids).tolist()
        docs.append((ids, [0] + [1] * (len(ids) - 1) if mask is None else np.asarray(mask).tolist()))
    return docs


def language_modeling(model: MiniMindForCausalLM, tokenizer: Tokenizer, records: Sequence[tuple[int, Any]],
                      kind: str, path: str, batch_size: int = 8, seq_len: int = 1024) -> dict[str, float]:
    """Mean loss (nats per scored token), perplexity and bits per byte over all documents."""
    seq_len = min(seq_len, model.config.max_position_embeddings - 1)
    docs = encode_documents(tokenizer, records, kind, path)
    pieces = [w for ids, scored in docs for w in windows(ids, scored, seq_len)]
    nats = sum(score_sequences(model, pieces, batch_size))
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
