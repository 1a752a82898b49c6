"""``python main.py generate``: black-box distillation data, a teacher's answers to prompts in SFT format.

Each output line is ``{"conversations": [...the prompt's messages..., {"role": "assistant", "content":
answer}]}``; a ``<think>...</think>`` block in the answer goes to ``reasoning_content``. Any SFT run
trains on the file as it is (empty answers, which it counts and reports, excepted: SFT refuses them). Lines
are appended and flushed one by one, so an interrupted run loses at most the batch in flight: started again
with the same ``--out``, it skips the prompts already answered. A last line that the stopped run did not
finish (not valid JSON) is removed, saying so; a complete last line that lacks only its newline is kept.

Image rows (a MiniMind-V teacher): lines ``{"conversations": [...], "images": ["a.jpg", ...]}`` with ``<image>``
where each image goes (paths relative to the jsonl), MiniMind-V's data format; the images enter at the row's
prefill, batched with text rows, and the output line keeps them (paths relative to ``--out``), so it trains
as it is.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

from minimind_pl.chat_format import count_image_tags, empty_answer, split_reasoning
from minimind_pl.checkpoints import open_checkpoint, pick_device
from minimind_pl.commands.images import expanded_conversation, image_problem, read_image, stacked
from minimind_pl.data.jsonl import parse_line, read_jsonl
from minimind_pl.errors import UserError, check_input_file
from minimind_pl.generation import SamplingSettings, generate
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.vision.preprocess import ImageError

DEFAULT = SamplingSettings()


def prompt_messages(record: Any, where: str) -> list[dict]:
    """The messages to answer: ``{"prompt": text}`` or ``{"conversations": [...]}`` (a final assistant
    message, as in ordinary SFT data, is dropped so that the teacher answers instead).

    Args:
        record: One parsed jsonl line.
        where: ``file:line`` for error messages.
    """
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{where}: expected {{\"conversations\": [messages]}} or {{\"prompt\": text}}")
    if messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1].get("role") != "user":
        raise UserError(f"{where}: the last message to answer must be the user's")
    return messages


def prompt_images(record: Any, messages: list[dict], folder: Path, where: str) -> tuple[str, ...]:
    """The absolute paths of a line's ``images`` (relative ones are read from ``folder``, the jsonl's), one per
    ``<image>`` tag of its messages; none for a line without the field."""
    images = record.get("images") if isinstance(record, dict) else None
    if images is None:
        return ()
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise UserError(f"{where}: images must be a list of image paths")
    tags = count_image_tags(messages)
    if tags != len(images):
        raise UserError(f"{where}: {tags} <image> tag(s) but {len(images)} image(s): each image needs one tag "
                        f"where it goes, each tag one image")
    return tuple(os.path.abspath(folder / image) for image in images)


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer: its messages, its images (absolute paths) and where it was read (``file:line``)."""

    messages: list[dict]
    images: tuple[str, ...] = ()
    where: str = ""

    @property
    def key(self) -> str:
        return prompt_key(self.messages, self.images)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a jsonl file; a bad line raises UserError naming it."""
    prompts = []
    for line_no, record in read_jsonl(path, "--data"):
        where = f"{path}:{line_no}"
        messages = prompt_messages(record, where)
        prompts.append(Prompt(messages, prompt_images(record, messages, Path(path).parent, where), where))
    return prompts


def prompt_key(messages: list[dict], images: tuple[str, ...] = ()) -> str:
    """A canonical string of a prompt's messages (and absolute image paths), to recognise prompts already
    answered."""
    return json.dumps({"conversations": messages, "images": list(images)} if images else messages,
                      ensure_ascii=False, sort_keys=True)


def complete_last_line(out: Path) -> bytes:
    """The bytes of ``out``, its last line ended: a complete line that lacks only its newline gets it; a line
    cut off by a stopped run (not valid JSON) is removed from the file, saying which line that was."""
    data = out.read_bytes()
    if not data or data.endswith(b"\n"):
        return data
    start = data.rfind(b"\n") + 1
    last = data[start:]
    line_no = data.count(b"\n") + 1
    _, error = parse_line(last, line_no)
    if error and last.strip():
        with open(out, "r+b") as f:
            f.truncate(start)
        print(f"note: line {line_no} of {out} was cut off by a stopped run ({error}); removed it, "
              "its prompt is answered again", flush=True)
        return data[:start]
    with open(out, "ab") as f:
        f.write(b"\n")
    return data + b"\n"


def answered_keys(out: Path) -> Counter:
    """Count the prompts answered in ``out`` (see :func:`complete_last_line` for a last line without newline)."""
    if not out.exists():
        return Counter()
    check_input_file(out, "--out", expected="a jsonl file (the answers)")
    done = Counter()
    for line_no, raw in enumerate(complete_last_line(out).split(b"\n"), start=1):
        if raw.strip():
            record, error = parse_line(raw, line_no)
            try:
                images = tuple(os.path.abspath(out.parent / image) for image in record.get("images") or [])
                done[prompt_key(record["conversations"][:-1], images)] += 1
            except (KeyError, TypeError) as err:
                raise UserError(f"{out}:{line_no}: not an answer line of this tool ({error or repr(err)}); "
                                "--out must be a file this command wrote, or a new path") from err
    return done


def pending_prompts(prompts: list[Prompt], done: Counter) -> list[Prompt]:
    """The prompts not yet answered (duplicates count: two equal prompts need two answers)."""
    done = Counter(done)
    pending = []
    for prompt in prompts:
        if done[prompt.key] > 0:
            done[prompt.key] -= 1
        else:
            pending.append(prompt)
    return pending


def sft_record(messages: list[dict], reply: str, opened: bool = False, images: list[str] = ()) -> dict:
    """An SFT line: the prompt's messages plus the assistant's answer (and its reasoning, if any); with
    ``images`` (paths), a MiniMind-V line."""
    answer, reasoning = split_reasoning(reply, opened)
    assistant = {"role": "assistant", "content": answer}
    if reasoning:
        assistant["reasoning_content"] = reasoning
    record: dict[str, Any] = {"conversations": [*messages, assistant]}
    if images:
        record["images"] = list(images)
    return record


def batches(items: list, size: int) -> Iterator[list]:
    """Consecutive chunks of ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate_command(
    ckpt: str,
    data: str,
    out: str,
    max_new_tokens: int = 512,
    temperature: float = DEFAULT.temperature,
    top_p: float = DEFAULT.top_p,
    batch_size: int = 16,
    open_thinking: bool = False,
    seed: int = 42,
    tokenizer: Optional[str] = None,
    allow_tokenizer_mismatch: bool = False,
    preset: Optional[str] = None,
    lora: Optional[str] = None,
    vision_encoder: Optional[str] = None,
    device: str = "auto",
    inference_rope_scaling: bool = False,
) -> str:
    """Answer every prompt of ``data`` with the teacher ``ckpt`` and write SFT jsonl to ``out`` (resumable).

    Args:
        ckpt: The teacher: a Lightning .ckpt, a MiniMind .pth (see ``preset``) or a Hugging Face directory.
        data: Prompts, jsonl: SFT lines whose last message is the user's (a final assistant message is
            dropped and answered anew) or ``{"prompt": text}`` lines; for a MiniMind-V teacher also
            ``{"conversations": [...], "images": [paths]}`` lines (``<image>`` where each image goes).
        out: Output jsonl. If it exists, prompts already answered there are skipped and new lines appended.
        max_new_tokens: Longest answer in tokens.
        temperature: Sampling temperature (0 = greedy).
        top_p: Nucleus sampling threshold.
        batch_size: Prompts generated together (left-padded, KV cache).
        open_thinking: Leave a ``<think>`` block open in the prompt so that the teacher reasons first; the
            reasoning is written to ``reasoning_content``.
        seed: Seed of the sampling.
        tokenizer: Tokenizer directory; default: the one recorded with the checkpoint.
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a .pth checkpoint (default: read off the tensor shapes).
        lora: A LoRA adapter file run on top of the teacher's weights (unmerged).
        vision_encoder: The vision tower folder of a MiniMind-V teacher (default: the one its stage checkpoint
            recorded).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda:0``, ...
        inference_rope_scaling: YaRN RoPE scaling (MiniMind's settings) for prompts beyond the trained length.
    """
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    out_path = Path(out)
    prompts = read_prompts(data)
    pending = pending_prompts(prompts, answered_keys(out_path))
    already = len(prompts) - len(pending)
    print(f"{len(prompts)} prompts in {data}; {already} already answered in {out_path}", flush=True)
    if not pending:
        return str(out_path)
    checkpoint = open_checkpoint(ckpt, lora)
    model = checkpoint.build_model(preset, device=device, inference_rope_scaling=inference_rope_scaling,
                                   vision_encoder=vision_encoder)
    with_images = next((p for p in pending if p.images), None)
    if with_images is not None and image_problem(model):
        raise UserError(f"{with_images.where} has images: {image_problem(model)}")
    tok = checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}; "
                        "give the model's own tokenizer with --tokenizer")
    sampling = dict(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id,
                    sampling=SamplingSettings(temperature=temperature, top_p=top_p),
                    generator=torch.Generator(device=pick_device(device)).manual_seed(seed))
    with tqdm(total=len(prompts), initial=already, desc="generate", unit="prompt") as bar:
        truncated, empty = append_answers(model, tok, pending, out_path, batch_size, open_thinking, sampling,
                                          bar.update)
    if truncated:
        print(f"warning: {truncated} of {len(pending)} answers were cut at max_new_tokens={max_new_tokens}; "
              "raise it or filter them before training", flush=True)
    if empty:
        print(f"warning: {empty} of {len(pending)} answers are empty (no answer after any reasoning); SFT refuses "
              "such lines: remove them, or train with --data.skip_invalid true", flush=True)
    return str(out_path)


def append_answers(model: torch.nn.Module, tok: Tokenizer, pending: list[Prompt], out: Path, batch_size: int,
                   open_thinking: bool, sampling: dict, progress: Callable[[int], Any]) -> tuple[int, int]:
    """Answer ``pending`` batch by batch, appending one flushed SFT line per prompt.

    Returns how many answers were cut at ``max_new_tokens`` and how many are empty (SFT refuses those).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    truncated = empty = 0
    with open(out, "a", encoding="utf-8") as f:
        for batch in batches(pending, batch_size):
            ids = [tok.encode_chat(expanded_conversation(model, p.messages, len(p.images), p.where),
                                   open_thinking=open_thinking) for p in batch]
            replies = generate(model, ids, images=[prompt_pixels(model, p) for p in batch], **sampling)
            for prompt, ids in zip(batch, replies):
                images = [os.path.relpath(image, out.parent.absolute()) for image in prompt.images]
                record = sft_record(prompt.messages, tok.decode(ids), opened=open_thinking, images=images)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                truncated += len(ids) >= sampling["max_new_tokens"]
                empty += empty_answer(record["conversations"][-1])
            progress(len(batch))
    return truncated, empty


def prompt_pixels(model: torch.nn.Module, prompt: Prompt) -> Optional[torch.Tensor]:
    """A prompt's images read for ``model`` (N, 3, H, W), or None; a UserError naming the file and line."""
    try:
        return stacked([read_image(model, image) for image in prompt.images])
    except (ImageError, OSError) as error:
        raise UserError(f"{prompt.where}: {error}") from None
