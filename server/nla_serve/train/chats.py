"""Chat transcripts written by the target itself: the most in-distribution text for a chat server.

Prompts are varied on purpose (everyday questions, writing tasks, Python questions built from the
documentation's topic names, questions about Bible verses) and drawn in a seeded order. The
target answers each with sampling (temperature 0.7, top-p 0.9) through ``writer.TextWriter``
(vLLM, or batched transformers with left padding). Each
transcript keeps the exact token ids the target saw and wrote (chat template, one BOS, up to and
including its end-of-turn token), because activations must come from exactly that stream.
Transcripts are appended batch by batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from nla_serve.train.corpus import Document

if TYPE_CHECKING:
    from nla_serve.train.writer import TextWriter

GENERAL = [
    "How do I boil an egg so the yolk stays soft?", "What is the difference between weather and climate?",
    "Give me three tips for sleeping better.", "Why is the sky blue?", "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?", "Explain compound interest with an example.",
    "Write a short poem about the sea.", "Tell me a fun fact about octopuses.", "How do vaccines work?",
    "What is a good way to start learning to play the guitar?", "Summarize the water cycle.",
    "Write a polite email asking my landlord to fix the heating.", "What are prime numbers?",
    "How can I be more productive when working from home?", "Describe a sunset to someone who cannot see.",
    "What causes the seasons on Earth?", "Suggest a healthy breakfast I can make in five minutes.",
    "How do I apologize to a friend I upset?", "What is photosynthesis?", "Write a haiku about autumn.",
    "Explain what a black hole is to a ten-year-old.", "What are the rules of chess, briefly?",
    "How do I make a simple tomato sauce?", "What is the capital of Australia, and why not Sydney?",
    "Give me a short story about a lost dog finding its way home.", "How do airplanes fly?",
    "What is the difference between a virus and a bacterium?", "How many planets are in the solar system?",
    "What is machine learning in one paragraph?", "Translate 'good morning, how are you?' into French.",
    "What should I do if my phone gets wet?", "List five animals that live in the desert.",
    "How do I calculate the area of a circle?", "Write a limerick about a cat.", "Why do we dream?",
    "What is the best way to memorize a speech?", "Explain supply and demand.", "Who invented the telephone?",
    "How do I keep houseplants alive?", "What is 15% of 80? Show your steps.", "Why do leaves change colour?",
]
TASKS = [
    "Write a short paragraph about {}.", "Give me three facts about {}.", "Explain {} in simple terms.",
    "What are the pros and cons of {}?", "Write a tweet about {}.", "Tell me a joke about {}.",
]
SUBJECTS = [
    "coffee", "the moon", "volcanoes", "friendship", "rainforests", "trains", "honey bees", "the ocean",
    "recycling", "electric cars", "the history of bread", "mountains", "libraries", "winter", "music",
    "gardening", "the internet", "dinosaurs", "chocolate", "running", "cities at night", "clocks",
]
PYTHON = ["Explain the Python topic '{}' with a small example.", "How does {} work in Python?",
          "What should a beginner know about {} in Python?"]
BIBLE = ["What does this Bible verse mean: \"{}\"", "Rewrite this verse in modern English: \"{}\""]


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` varied user prompts, in a seeded order (the first ``n`` of a fixed shuffled pool)."""
    rng = random.Random(seed)
    pool = list(GENERAL) + [t.format(s) for t in TASKS for s in SUBJECTS]
    try:
        from pydoc_data.topics import topics

        pool += [t.format(name.replace("-", " ")) for t in PYTHON for name in sorted(topics)]
    except ImportError:  # pragma: no cover - every CPython ships pydoc_data
        pass
    try:
        from nla_serve.train.corpus import kjv_documents

        verses = [d.text.split(". ")[0][:160] for d in kjv_documents()][::12]
        pool += [BIBLE[i % len(BIBLE)].format(v) for i, v in enumerate(verses)]
    except (FileNotFoundError, ImportError):
        pass
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def generate_chats(target: str, out: Path, n: int, *, max_new_tokens: int = 160, batch_size: int = 8,
                   seed: int = 0, device: str = "cpu", engine: str = "transformers", prompts: list[str] | None = None,
                   progress: bool = True, writer: "TextWriter | None" = None) -> list[Document]:
    """Append transcripts to ``out`` (jsonl) until it holds ``n``; return all ``n``."""
    from nla_serve.train.writer import write_answers

    prompts = (prompts or chat_prompts(n, seed))[:n]

    def transcript(i: int, x: list[int], g: list[int], text: str) -> Document:
        return Document(id=f"chat-{i}", source="chat", ids=x + g, prompt_len=len(x), user=prompts[i], text=text)

    return write_answers(target, out, prompts, transcript, max_new_tokens=max_new_tokens, seed=seed, device=device,
                         engine=engine, batch_size=batch_size, progress=progress, desc="chats", writer=writer)
