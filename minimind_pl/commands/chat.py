"""``python main.py chat``: talk to a trained model in the terminal, with streaming output.

A pretrained (not yet chat-tuned) checkpoint continues raw text instead: each prompt is a document start
(``<bos>`` + text), as MiniMind's ``eval_llm.py`` feeds its pretrain weights. After each answer the speed
(tokens/s) goes to stderr, so the answer alone can be piped.

A MiniMind-V model is shown images: ``--image PATH`` (repeatable) goes with the first question, ``/image PATH``
in the session with the next one. An image stays in the conversation with its turn: every answer re-renders the
kept turns, their ``<image>`` tags becoming placeholders again, and their images enter at the prefill.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator, Literal, Sequence, TextIO

import torch

from minimind_pl.chat_format import Reply, parse_reply
from minimind_pl.checkpoints import Checkpoint, open_checkpoint
from minimind_pl.commands.images import expanded_conversation, image_problem, read_image, stacked, with_image_tags
from minimind_pl.errors import UserError
from minimind_pl.generation import SamplingSettings, stream_generate
from minimind_pl.vision.preprocess import ImageError
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.tools import Episode, Tool, Toolbox, ToolResult, run_episode, with_builtin_tools

DEFAULT = SamplingSettings()
IMAGE_COMMAND = "/image "  # a session line that attaches an image to the next question


class ChatSession:
    """A conversation with a model: keeps the history and streams each answer as text."""

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Tokenizer, system: str | None = None,
                 history_turns: int = 4, open_thinking: bool = False, max_new_tokens: int = 512,
                 sampling: SamplingSettings = DEFAULT, text_mode: bool = False) -> None:
        """Args:
            model: The model to talk to.
            tokenizer: Its tokenizer (with the chat template).
            system: An optional system prompt.
            history_turns: How many earlier question/answer pairs the model sees (0 = none).
            open_thinking: Let the model reason in a ``<think>`` block first.
            max_new_tokens: Longest answer in tokens.
            sampling: How tokens are chosen.
            text_mode: Continue each prompt as raw text (pretrained models): no template, no history.
        """
        self.model, self.tokenizer = model, tokenizer
        self.system, self.history_turns, self.open_thinking = system, history_turns, open_thinking
        self.max_new_tokens, self.sampling, self.text_mode = max_new_tokens, sampling, text_mode
        self.history: list[dict[str, str]] = []
        self.history_images: list[list[torch.Tensor]] = []  # per message of ``history``: its images, (3, H, W)
        self.last_speed: tuple[int, float] = (0, 0.0)  # tokens and seconds of the last answer

    def read_image(self, path: str) -> torch.Tensor:
        """An image file as the (3, H, W) tensor the model's tower reads; a UserError naming the file."""
        problem = image_problem(self.model)
        if problem is not None:
            raise UserError(f"cannot show {path} to the model: {problem}")
        try:
            return read_image(self.model, path)
        except (ImageError, OSError) as error:
            raise UserError(f"{path}: {error}") from None

    def prompt(self, user_text: str, images: Sequence[torch.Tensor] = ()) -> tuple[list[int], list[torch.Tensor]]:
        """Token ids of the system prompt, the kept history and the new user turn, ready to answer, and the
        images of those turns in order (in text mode: the text as a document start, no images)."""
        if self.text_mode:
            if images:
                raise UserError("images need the chat template: --mode chat")
            return self.tokenizer.encode_text(user_text), []
        messages, all_images = self.conversation(user_text, images)
        return self.tokenizer.encode_chat(messages, open_thinking=self.open_thinking), all_images

    def conversation(self, user_text: str,
                     images: Sequence[torch.Tensor] = ()) -> tuple[list[dict], list[torch.Tensor]]:
        """The system prompt, the kept history and the new user turn as messages, and the images of those turns."""
        keep = 2 * self.history_turns if self.history_turns > 0 else 0
        kept = self.history[-keep:] if keep else []
        kept_images = [image for row in (self.history_images[-keep:] if keep else []) for image in row]
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + kept
        messages.append({"role": "user", "content": with_image_tags(user_text, len(images))})
        all_images = kept_images + list(images)
        return expanded_conversation(self.model, messages, len(all_images), "the conversation"), all_images

    def prompt_ids(self, user_text: str, images: Sequence[torch.Tensor] = ()) -> list[int]:
        """The token ids of :meth:`prompt`."""
        return self.prompt(user_text, images)[0]

    def stream_ids(self, ids: list[int], images: Sequence[torch.Tensor] = ()) -> Iterator[str]:
        """Yield the reply to a prompt's token ids piece by piece (never a broken character); its speed goes to
        ``last_speed``."""
        decoder = self.tokenizer.stream_decoder()
        start, count = time.perf_counter(), 0
        for token in stream_generate(self.model, ids, self.max_new_tokens, self.sampling, self.tokenizer.eos_id,
                                     images=stacked(list(images))):
            count += 1
            self.last_speed = (count, time.perf_counter() - start)
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def answer_with_tools(self, user_text: str, toolbox: Toolbox, out: TextIO, max_turns: int = 3) -> Episode:
        """Answer with tools (``tools.run_episode``): each reply streams to ``out``, each call is run and shown with
        its result, until a reply calls none or ``max_turns`` replies were made. The history keeps the question and
        the last reply (the tool turns between them are not shown to later questions)."""
        if self.text_mode:
            raise UserError("tools need the chat template: --mode chat")
        schemas = toolbox.schemas()

        def reply(messages: list[dict]) -> tuple[Reply, dict]:
            ids = self.tokenizer.encode_chat(messages, open_thinking=self.open_thinking, tools=schemas)
            text = "".join(write_piece(out, piece) for piece in self.stream_ids(ids))
            out.write("\n")
            return parse_reply(text, self.open_thinking), {"role": "assistant", "content": text}

        def show(result: ToolResult) -> None:
            out.write(f"[tool] {result.name}({json.dumps(result.arguments, ensure_ascii=False)}) -> {result.output}\n")
            out.flush()

        messages, _ = self.conversation(user_text)
        episode = run_episode(reply, messages, toolbox, max_turns, on_result=show)
        if episode.unfinished:
            out.write(f"[tool] still calling tools after {max_turns} replies: no final answer\n")
        self.history += [messages[-1], episode.messages[-1] if episode.messages[-1]["role"] == "assistant"
                         else {"role": "assistant", "content": ""}]
        self.history_images += [[], []]
        return episode

    def stream_answer(self, user_text: str, images: Sequence[torch.Tensor] = ()) -> Iterator[str]:
        """Yield the answer piece by piece (never a broken character); record the turn, with its ``images``
        ((3, H, W) each, see :meth:`read_image`), in the history."""
        pieces: list[str] = []
        ids, prompt_images = self.prompt(user_text, images)
        for piece in self.stream_ids(ids, prompt_images):
            pieces.append(piece)
            yield piece
        if not self.text_mode:
            self.history += [{"role": "user", "content": with_image_tags(user_text, len(images))},
                             {"role": "assistant", "content": "".join(pieces)}]
            self.history_images += [list(images), []]


def chat_command(
    ckpt: str,
    lora: str | None = None,
    prompt: str | None = None,
    image: list[str] | None = None,
    vision_encoder: str | None = None,
    tokenizer: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    preset: str | None = None,
    system: str | None = None,
    open_thinking: bool = False,
    history_turns: int = 4,
    max_new_tokens: int = 512,
    temperature: float = DEFAULT.temperature,
    top_p: float = DEFAULT.top_p,
    top_k: int = DEFAULT.top_k,
    repetition_penalty: float = DEFAULT.repetition_penalty,
    seed: int | None = None,
    device: str = "auto",
    mode: Literal["auto", "chat", "text"] = "auto",
    inference_rope_scaling: bool = False,
    tools: bool = False,
    user_tools: list[Tool] | None = None,
    max_tool_turns: int = 3,
) -> None:
    """Chat with a model in the terminal; answers stream as they are generated, then their speed (tokens/s).

    Args:
        ckpt: A Lightning .ckpt of any stage, a MiniMind .pth or a Hugging Face directory.
        lora: A LoRA adapter file (LoRA stage .ckpt or MiniMind LoRA .pth) run on top of ``ckpt``, unmerged.
        prompt: Answer this one prompt and exit, instead of an interactive session.
        image: An image file shown with the first question (repeatable: ``--image a.jpg --image b.png``), for a
            MiniMind-V model; the question may place them with ``<image>`` tags, else they come first. In the
            session, ``/image PATH`` attaches one to the next question.
        vision_encoder: The vision tower folder of a MiniMind-V checkpoint (SigLIP / CLIP, Hugging Face format);
            default: the folder its stage checkpoint recorded.
        tokenizer: Tokenizer directory (default: the one recorded with the checkpoint).
        allow_tokenizer_mismatch: Use ``--tokenizer`` (or the recorded folder) even when it is not the tokenizer
            the checkpoint was trained with (checkpoints record its fingerprint): a warning instead of an error.
        preset: Model preset of a MiniMind .pth, which stores no config (default: read from the tensor shapes).
        system: An optional system prompt.
        open_thinking: Let the model write its reasoning in a <think> block before the answer.
        history_turns: How many earlier question/answer pairs the model sees (0 = none).
        max_new_tokens: Longest answer in tokens.
        temperature: Sampling temperature; 0 means greedy.
        top_p: Nucleus sampling threshold.
        top_k: Sample among the k most likely tokens (0 = all).
        repetition_penalty: Penalty (>1) on tokens already in the prompt or answer.
        seed: Random seed for reproducible sampling.
        device: ``auto``, ``cpu`` or ``cuda``.
        mode: ``chat`` (the chat template), ``text`` (continue raw text, for pretrained checkpoints) or ``auto``:
            text for a checkpoint of the Pretrain stage (or, with no stage recorded, a file named like MiniMind's
            ``pretrain_*.pth``), chat otherwise.
        inference_rope_scaling: YaRN RoPE scaling (MiniMind's settings) for prompts beyond the trained length.
        tools: Offer the model MiniMind's six mock tools (calculator, units, weather, time, exchange rates,
            translation; ``minimind_pl.tools``) and run its calls here: each call and its result are shown, and the
            model answers again with the results.
        user_tools: Tools of your own, offered with ``--tools true`` (a tool of a built-in one's name replaces it),
            each ``{"class_path": ..., "init_args": ...}`` naming a ``minimind_pl.tools.Tool``.
        max_tool_turns: With tools: most replies per question (the last one may not call tools any more).
    """
    toolbox = Toolbox(with_builtin_tools(user_tools or ())) if tools else None
    if seed is not None:
        torch.manual_seed(seed)
    checkpoint = open_checkpoint(ckpt, lora)
    sampling = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty)
    text_mode = continues_text(checkpoint, mode)
    session = ChatSession(
        checkpoint.build_model(preset, device=device, inference_rope_scaling=inference_rope_scaling,
                               vision_encoder=vision_encoder),
        checkpoint.tokenizer(tokenizer, allow_tokenizer_mismatch), system=system, history_turns=history_turns,
        open_thinking=open_thinking, max_new_tokens=max_new_tokens, sampling=sampling, text_mode=text_mode,
    )
    if text_mode and mode == "auto":
        print(f"{ckpt} is a pretrained checkpoint: continuing raw text (--mode chat to use the chat template)",
              file=sys.stderr, flush=True)
    images = [session.read_image(path) for path in image or []]
    if toolbox is not None and images:
        raise UserError("--tools and --image do not go together yet")
    if prompt is not None:
        respond(session, prompt, images, toolbox, max_tool_turns)
        return
    interactive(session, images, toolbox, max_tool_turns)


def respond(session: ChatSession, user_text: str, images: list[torch.Tensor], toolbox: Toolbox | None,
            max_tool_turns: int) -> None:
    """Answer one question on stdout: with the tools' loop when there are tools, else streamed as it comes."""
    if toolbox is None:
        print_answer(session, user_text, sys.stdout, images=images)
    else:
        session.answer_with_tools(user_text, toolbox, sys.stdout, max_tool_turns)


def interactive(session: ChatSession, images: list[torch.Tensor], toolbox: Toolbox | None = None,
                max_tool_turns: int = 3) -> None:
    """The terminal session: questions until an empty line or Ctrl-D; ``/image PATH`` lines attach images to the
    next question (``images``: those already attached). A refused image or question is reported, and the
    session goes on."""
    print("chat with the model; /image PATH attaches an image to the next question; an empty line or Ctrl-D ends "
          "the session")
    while True:
        try:
            user_text = input("\nyou> ").strip()
        except EOFError:
            break
        if not user_text:
            break
        try:
            if user_text.startswith(IMAGE_COMMAND):
                images.append(session.read_image(user_text[len(IMAGE_COMMAND):].strip()))
                print(f"({len(images)} image(s) attached to the next question)")
                continue
            print("model> ", end="")
            respond(session, user_text, images, toolbox, max_tool_turns)
            images = []
        except UserError as error:
            print(f"error: {error}")


def continues_text(checkpoint: Checkpoint, mode: str) -> bool:
    """Whether ``chat`` continues raw text: ``--mode text``, or ``auto`` with a pretrained checkpoint."""
    if mode != "auto":
        return mode == "text"
    if checkpoint.stage is not None:
        return checkpoint.stage == "Pretrain"
    return Path(checkpoint.path).name.lower().startswith("pretrain")  # MiniMind's out/pretrain_768.pth


def write_piece(out: TextIO, piece: str) -> str:
    """Write a streamed piece at once; return it."""
    out.write(piece)
    out.flush()
    return piece


def print_answer(session: ChatSession, user_text: str, out: TextIO, speed: TextIO | None = None,
                 images: Sequence[torch.Tensor] = ()) -> str:
    """Stream one answer to ``out``, then its speed to ``speed`` (default: stderr); return the answer whole."""
    speed = speed or sys.stderr
    parts = []
    for piece in session.stream_answer(user_text, images):
        parts.append(write_piece(out, piece))
    out.write("\n")
    tokens, seconds = session.last_speed
    speed.write(f"[{tokens} tokens, {tokens / seconds if seconds else 0.0:.1f} tokens/s]\n")
    speed.flush()
    return "".join(parts)
