"""Deterministic bilingual (English / Chinese) synthetic corpus for ``python main.py demo``.

The demo trains a tiny model on CPU in minutes, so it needs a small world it can actually learn:

* 38 invented entities: 12 towns, 6 rivers, 10 inventors, 10 animals, each named in English and
  Chinese. Ten attributes (``town.river``, ``town.food``, ``town.year``, ``river.colour``,
  ``river.source``, ``inventor.invention``, ``inventor.hometown``, ``animal.colour``, ``animal.food``,
  ``animal.home``) give 98 facts whose values the seed draws from fixed pools.
* About 20% of the facts of every attribute are *held out*: pretraining states them (as
  encyclopedic sentences and as question/answer lines, both languages, several paraphrases), but
  no SFT, LoRA, DPO or distillation record ever mentions them. SFT teaches the answer format on the
  other facts of the same attributes, so answering a held-out question shows knowledge carried
  over from pretraining.
* Small additions and subtractions, and the assistant identity ("I am MiniMind, a small language
  model made by the minimind_pl project."). ``lora_identity.jsonl`` renames the assistant
  "Lumen" / "流明" for the LoRA stage; that name appears in no other file.

Everything is pure Python and seeded: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

IDENTITY_NAME = "MiniMind"
LORA_NAME = "Lumen"
LORA_NAME_ZH = "流明"
LANGS = ("en", "zh")
HELDOUT_FRACTION = 0.2

FILE_NAMES = {
    "pretrain": "pretrain.jsonl",
    "pretrain_val": "pretrain_val.jsonl",
    "sft": "sft.jsonl",
    "sft_val": "sft_val.jsonl",
    "heldout_qa": "heldout_qa.jsonl",
    "identity_qa": "identity_qa.jsonl",
    "lora_identity": "lora_identity.jsonl",
    "dpo": "dpo.jsonl",
    "dpo_val": "dpo_val.jsonl",
    "distill_prompts": "distill_prompts.jsonl",
    "grpo_arith": "grpo_arith.jsonl",
    "arith_reworded": "arith_reworded.jsonl",
    "arith_qa": "arith_qa.jsonl",
}

# ----------------------------------------------------------------------------- the world

ENTITIES = {
    "town": (("Velt", "维尔特"), ("Quillon", "奎隆"), ("Marrow", "马洛"), ("Dunmere", "邓米尔"),
             ("Ostrel", "奥斯特雷"), ("Pellin", "佩林"), ("Karsk", "卡斯克"), ("Lirabel", "莉拉贝"),
             ("Tovin", "托文"), ("Brask", "布拉斯克"), ("Emberly", "恩伯利"), ("Solvik", "索尔维克")),
    "river": (("Ossa", "奥萨河"), ("Varn", "瓦恩河"), ("Tellis", "特利斯河"), ("Mira", "米拉河"),
              ("Quen", "昆恩河"), ("Dorrow", "多罗河")),
    "inventor": (("Ada Lorne", "艾达·洛恩"), ("Boris Tenk", "鲍里斯·滕克"), ("Cora Venn", "科拉·文恩"),
                 ("Dax Orlo", "达克斯·奥洛"), ("Elsa Mirk", "埃尔莎·米尔克"),
                 ("Felix Brand", "费利克斯·布兰德"), ("Gina Holt", "吉娜·霍尔特"),
                 ("Hugo Sarn", "雨果·萨恩"), ("Iris Wren", "艾丽丝·雷恩"), ("Jonas Kett", "乔纳斯·凯特")),
    "animal": (("glowfox", "光狐"), ("mossback turtle", "苔背龟"), ("dune hare", "沙丘兔"),
               ("snow goat", "雪山羊"), ("reed crane", "芦苇鹤"), ("fire lizard", "火蜥蜴"),
               ("cloud pig", "云朵猪"), ("bell deer", "铃铛鹿"), ("thorn cat", "荆棘猫"),
               ("mist eel", "雾鳗")),
}

COLOURS = (("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
           ("white", "白色"), ("black", "黑色"), ("orange", "橙色"), ("grey", "灰色"), ("pink", "粉色"))
MOUNTAINS = (("Mount Harl", "哈尔山"), ("Mount Pelo", "佩洛山"), ("Mount Izen", "伊森山"),
             ("Mount Cray", "克雷山"), ("Mount Ubo", "乌波山"), ("Mount Fennick", "芬尼克山"))
TOWN_FOODS = (("noodles", "面条"), ("dumplings", "饺子"), ("bread", "面包"), ("pancakes", "煎饼"),
              ("fish soup", "鱼汤"), ("pie", "馅饼"), ("plum tea", "梅子茶"), ("rice cakes", "年糕"),
              ("sausages", "香肠"), ("millet porridge", "小米粥"), ("roast duck", "烤鸭"),
              ("pickles", "泡菜"))
ANIMAL_FOODS = (("apples", "苹果"), ("honey", "蜂蜜"), ("worms", "虫子"), ("carrots", "胡萝卜"),
                ("nuts", "坚果"), ("berries", "浆果"), ("seeds", "种子"), ("cheese", "奶酪"),
                ("mushrooms", "蘑菇"), ("grass", "青草"), ("corn", "玉米"), ("leaves", "树叶"))
INVENTIONS = (("clock", "时钟"), ("kite", "风筝"), ("lamp", "台灯"), ("compass", "指南针"),
              ("bicycle", "自行车"), ("telescope", "望远镜"), ("umbrella", "雨伞"), ("piano", "钢琴"),
              ("map", "地图"), ("mirror", "镜子"), ("ladder", "梯子"), ("whistle", "哨子"))
YEARS = tuple((str(y), str(y)) for y in range(1050, 1900))

# attribute -> value pool; the subject kind is the part before the dot.
ATTRIBUTE_POOLS = {
    "town.river": ENTITIES["river"], "town.food": TOWN_FOODS, "town.year": YEARS,
    "river.colour": COLOURS, "river.source": MOUNTAINS,
    "inventor.invention": INVENTIONS, "inventor.hometown": ENTITIES["town"],
    "animal.colour": COLOURS, "animal.food": ANIMAL_FOODS, "animal.home": ENTITIES["town"],
}

KIND_INTROS = {
    "town": ("{s} is a small town.", "{s}是一座小镇。"),
    "river": ("The {s} is a river.", "{s}是一条河。"),
    "inventor": ("{s} is an inventor.", "{s}是一位发明家。"),
    "animal": ("The {s} is an animal.", "{s}是一种动物。"),
}

# Per attribute: statements (the first three also serve as answers; the last is a terse
# "key: value" line) and questions, per language. {s} = subject, {v} = value.
TEMPLATES = {
    "town.river": {
        "en": ("The {v} flows through {s}.", "{s} lies on the {v}.", "The river of {s} is the {v}.",
               "{s}'s river: the {v}."),
        "zh": ("{v}流经{s}。", "{s}坐落在{v}边。", "{s}的河流是{v}。", "{s}的河流：{v}。"),
        "en_q": ("Which river flows through {s}?", "What river is {s} on?", "What is the river of {s}?"),
        "zh_q": ("哪条河流经{s}？", "{s}在哪条河边？", "{s}的河流是什么？"),
    },
    "town.food": {
        "en": ("{s} is famous for its {v}.", "The famous food of {s} is {v}.",
               "People in {s} love to eat {v}.", "{s}'s famous food: {v}."),
        "zh": ("{s}以{v}闻名。", "{s}的名菜是{v}。", "{s}的人爱吃{v}。", "{s}的特色美食：{v}。"),
        "en_q": ("What food is {s} famous for?", "What is the famous food of {s}?",
                 "What do people in {s} love to eat?"),
        "zh_q": ("{s}以什么美食闻名？", "{s}的名菜是什么？", "{s}的人爱吃什么？"),
    },
    "town.year": {
        "en": ("{s} was founded in {v}.", "The town of {s} was built in the year {v}.",
               "{s} has stood since {v}.", "{s}: founded in {v}."),
        "zh": ("{s}建于{v}年。", "{s}这座小镇是在{v}年建立的。", "{s}从{v}年起就存在了。", "{s}：{v}年建立。"),
        "en_q": ("When was {s} founded?", "In what year was {s} founded?", "In which year was {s} built?"),
        "zh_q": ("{s}是哪一年建立的？", "{s}建于哪一年？", "{s}是什么时候建立的？"),
    },
    "river.colour": {
        "en": ("The water of the {s} is {v}.", "The {s} is a {v} river.", "The {s} looks {v}.",
               "Colour of the {s}: {v}."),
        "zh": ("{s}的河水是{v}的。", "{s}是一条{v}的河。", "{s}看起来是{v}的。", "{s}的颜色：{v}。"),
        "en_q": ("What colour is the {s}?", "What colour is the water of the {s}?",
                 "What colour does the {s} look?"),
        "zh_q": ("{s}是什么颜色的？", "{s}的河水是什么颜色？", "{s}看起来是什么颜色？"),
    },
    "river.source": {
        "en": ("The {s} starts at {v}.", "The source of the {s} is {v}.", "The {s} begins on {v}.",
               "Source of the {s}: {v}."),
        "zh": ("{s}发源于{v}。", "{s}的源头是{v}。", "{s}从{v}流出。", "{s}的源头：{v}。"),
        "en_q": ("Where does the {s} start?", "What is the source of the {s}?", "Where does the {s} begin?"),
        "zh_q": ("{s}发源于哪里？", "{s}的源头在哪里？", "{s}从哪里流出？"),
    },
    "inventor.invention": {
        "en": ("{s} invented the {v}.", "The {v} was invented by {s}.",
               "The inventor {s} is known for the {v}.", "{s}'s invention: the {v}."),
        "zh": ("{s}发明了{v}。", "{v}是{s}发明的。", "发明家{s}以{v}闻名。", "{s}的发明：{v}。"),
        "en_q": ("What did {s} invent?", "What is {s} known for?", "Which invention is {s} famous for?"),
        "zh_q": ("{s}发明了什么？", "{s}有什么发明？", "发明家{s}以什么闻名？"),
    },
    "inventor.hometown": {
        "en": ("{s} was born in {v}.", "{s} comes from {v}.", "The hometown of {s} is {v}.",
               "{s}'s hometown: {v}."),
        "zh": ("{s}出生在{v}。", "{s}来自{v}。", "{s}的家乡是{v}。", "{s}的家乡：{v}。"),
        "en_q": ("Where was {s} born?", "Where does {s} come from?", "What is the hometown of {s}?"),
        "zh_q": ("{s}出生在哪里？", "{s}来自哪里？", "{s}的家乡是哪里？"),
    },
    "animal.colour": {
        "en": ("The {s} is {v}.", "The colour of the {s} is {v}.", "Every {s} is {v} all over.",
               "Colour of the {s}: {v}."),
        "zh": ("{s}是{v}的。", "{s}的颜色是{v}。", "{s}全身都是{v}的。", "{s}的颜色：{v}。"),
        "en_q": ("What colour is the {s}?", "What is the colour of the {s}?", "What colour is a {s}?"),
        "zh_q": ("{s}是什么颜色的？", "{s}的颜色是什么？", "{s}全身是什么颜色？"),
    },
    "animal.food": {
        "en": ("The {s} eats {v}.", "The favourite food of the {s} is {v}.", "The {s} loves to eat {v}.",
               "Favourite food of the {s}: {v}."),
        "zh": ("{s}吃{v}。", "{s}最爱吃的食物是{v}。", "{s}喜欢吃{v}。", "{s}最爱的食物：{v}。"),
        "en_q": ("What does the {s} eat?", "What is the favourite food of the {s}?",
                 "What does the {s} love to eat?"),
        "zh_q": ("{s}吃什么？", "{s}最爱吃的食物是什么？", "{s}喜欢吃什么？"),
    },
    "animal.home": {
        "en": ("The {s} lives near {v}.", "You can find the {s} around {v}.",
               "The home of the {s} is near {v}.", "Home of the {s}: {v}."),
        "zh": ("{s}生活在{v}附近。", "在{v}附近可以找到{s}。", "{s}的家在{v}附近。", "{s}的家：{v}。"),
        "en_q": ("Where does the {s} live?", "Where can you find the {s}?", "Where is the home of the {s}?"),
        "zh_q": ("{s}生活在哪里？", "在哪里可以找到{s}？", "{s}的家在哪里？"),
    },
}

QA_FORMATS = {"en": ("Q: {q} A: {a}", "Question: {q}\nAnswer: {a}"),
              "zh": ("问：{q} 答：{a}", "问题：{q}\n答案：{a}")}

ARITH = {
    "+": {"en": ("{a} + {b} = {c}.", "{a} plus {b} equals {c}.", "{a} plus {b} is {c}."),
          "zh": ("{a}+{b}={c}。", "{a}加{b}等于{c}。", "{a}加上{b}是{c}。"),
          "en_q": ("What is {a} plus {b}?", "What is {a} + {b}?", "Calculate {a} + {b}."),
          "zh_q": ("{a}加{b}等于几？", "{a}+{b}等于多少？", "计算{a}+{b}。")},
    "-": {"en": ("{a} - {b} = {c}.", "{a} minus {b} equals {c}.", "{a} minus {b} is {c}."),
          "zh": ("{a}-{b}={c}。", "{a}减{b}等于{c}。", "{a}减去{b}是{c}。"),
          "en_q": ("What is {a} minus {b}?", "What is {a} - {b}?", "Calculate {a} - {b}."),
          "zh_q": ("{a}减{b}等于几？", "{a}-{b}等于多少？", "计算{a}-{b}。")},
}

IDENTITY = {
    "en_q": ("Who are you?", "What is your name?", "Please introduce yourself.", "Who made you?",
             "What are you?", "Tell me about yourself."),
    "zh_q": ("你是谁？", "你叫什么名字？", "请介绍一下你自己。", "谁创造了你？", "你是什么？", "说说你自己吧。"),
    "en": ("I am {name}, a small language model made by the minimind_pl project.",
           "My name is {name}. I am a small language model made by the minimind_pl project.",
           "I'm {name}, a small language model built by the minimind_pl project. How can I help you?"),
    "zh": ("我是{name}，一个由minimind_pl项目制作的小型语言模型。",
           "我叫{name}，是minimind_pl项目制作的小型语言模型。",
           "我是{name}，由minimind_pl项目打造的小型语言模型。有什么可以帮你的吗？"),
    "en_wrong": ("I am ChatGPT, made by OpenAI.", "I don't know who I am.", "Why should I tell you?"),
    "zh_wrong": ("我是ChatGPT，由OpenAI开发。", "我不知道我是谁。", "凭什么告诉你？"),
}
IDENTITY_PRETRAIN = {
    "en": ("MiniMind is a small language model made by the minimind_pl project.",
           "MiniMind can answer questions about towns, rivers, inventors and animals.",
           "MiniMind can also do simple arithmetic, like 3 + 4 = 7."),
    "zh": ("MiniMind是一个由minimind_pl项目制作的小型语言模型。",
           "MiniMind能回答关于小镇、河流、发明家和动物的问题。",
           "MiniMind还会做简单的算术，比如3+4=7。"),
}
CHITCHAT = {
    "en_hello": ("Hello!", "Hi there!", "Good morning!"),
    "zh_hello": ("你好！", "嗨！", "早上好！"),
    "en_hello_a": "Hello! I am {name}. How can I help you today?",
    "zh_hello_a": "你好！我是{name}，有什么可以帮你的吗？",
    "en_thanks": ("Thank you!", "Thanks a lot!"),
    "zh_thanks": ("谢谢！", "非常感谢！"),
    "en_thanks_a": ("You're welcome!", "Glad I could help!"),
    "zh_thanks_a": ("不客气！", "很高兴能帮到你！"),
    "en_system": ("You are a helpful assistant.", "You are MiniMind, a friendly assistant."),
    "zh_system": ("你是一个乐于助人的助手。", "你是MiniMind，一个友好的助手。"),
}


@dataclass(frozen=True)
class Name:
    """A name or value in both languages."""

    en: str
    zh: str

    def get(self, lang: str) -> str:
        """Return the text in ``lang`` ("en" or "zh")."""
        return self.en if lang == "en" else self.zh


@dataclass(frozen=True)
class Fact:
    """One statement of the world: ``subject``'s ``attribute`` is ``value``."""

    attribute: str
    subject: Name
    value: Name

    @property
    def id(self) -> str:
        """Stable identifier such as ``"town.river:Velt"``."""
        return f"{self.attribute}:{self.subject.en}"

    @property
    def kind(self) -> str:
        """Entity kind of the subject ("town", "river", "inventor" or "animal")."""
        return self.attribute.split(".")[0]


@dataclass(frozen=True)
class World:
    """The invented world of one seed: all facts and which of them are held out of SFT."""

    seed: int
    facts: tuple[Fact, ...]
    heldout_ids: frozenset[str]

    @property
    def training_facts(self) -> tuple[Fact, ...]:
        """Facts that SFT, LoRA, DPO and distillation data may mention."""
        return tuple(f for f in self.facts if f.id not in self.heldout_ids)

    @property
    def heldout_facts(self) -> tuple[Fact, ...]:
        """Facts stated only in pretraining text (tested by ``heldout_qa.jsonl``)."""
        return tuple(f for f in self.facts if f.id in self.heldout_ids)

    def subjects(self) -> list[tuple[str, Name]]:
        """Every entity as ``(kind, name)``, in table order."""
        return [(kind, Name(*pair)) for kind, pairs in ENTITIES.items() for pair in pairs]

    def facts_of(self, subject: Name, training_only: bool = False) -> list[Fact]:
        """The facts about ``subject`` (only the training ones if ``training_only``)."""
        pool = self.training_facts if training_only else self.facts
        return [f for f in pool if f.subject == subject]


def _assign_values(rng: random.Random, n: int, pool: tuple) -> list[Name]:
    """Draw ``n`` values from ``pool``: distinct when the pool is big enough, else balanced."""
    if len(pool) >= n:
        return [Name(*p) for p in rng.sample(pool, n)]
    values = [Name(*pool[i % len(pool)]) for i in range(n)]
    rng.shuffle(values)
    return values


def _choose_heldout(rng: random.Random, facts: list[Fact]) -> frozenset[str]:
    """Hold out ~HELDOUT_FRACTION of the facts of every attribute (at least one each)."""
    ids = []
    for attribute in ATTRIBUTE_POOLS:
        group = [f for f in facts if f.attribute == attribute]
        k = max(1, round(HELDOUT_FRACTION * len(group)))
        ids.extend(f.id for f in rng.sample(group, k))
    return frozenset(ids)


def build_world(seed: int = 0) -> World:
    """Build the demo world of ``seed``: the values of every fact and the held-out split."""
    rng = random.Random(f"minimind_pl-demo-world:{seed}")
    facts = []
    for attribute, pool in ATTRIBUTE_POOLS.items():
        subjects = ENTITIES[attribute.split(".")[0]]
        values = _assign_values(rng, len(subjects), pool)
        facts.extend(Fact(attribute, Name(*s), v) for s, v in zip(subjects, values))
    return World(seed, tuple(facts), _choose_heldout(rng, facts))


# ----------------------------------------------------------------------------- scoring helpers

def _ascii_word_pattern(needle: str) -> re.Pattern:
    """Case-insensitive pattern for ``needle`` that does not match inside a longer ASCII word."""
    left = r"(?<![A-Za-z0-9_])" if needle[:1].isascii() and needle[:1].isalnum() else ""
    right = r"(?![A-Za-z0-9_])" if needle[-1:].isascii() and needle[-1:].isalnum() else ""
    return re.compile(left + re.escape(needle) + right, re.IGNORECASE)


def score_answer(answer: str, expected: str) -> bool:
    """True if ``expected`` occurs in ``answer`` (case-insensitive substring).

    An expected string that starts or ends with an ASCII letter or digit must not sit inside a
    longer ASCII word or identifier ("red" is not in "bored", "12" not in "112", "MiniMind" not in
    "minimind_pl"); Chinese text
    needs no spaces around it.
    """
    expected = expected.strip()
    if not expected:
        return False
    return _ascii_word_pattern(expected).search(answer) is not None


def mentions_fact(text: str, fact: Fact) -> bool:
    """True if ``text`` names both the subject and the value of ``fact`` (any language mix).

    Plain case-insensitive substrings: deliberately stricter than ``score_answer`` so that the
    held-out check errs on the side of calling something a leak.
    """
    low = text.lower()
    subject = any(fact.subject.get(lang).lower() in low for lang in LANGS)
    return subject and any(fact.value.get(lang).lower() in low for lang in LANGS)


# ----------------------------------------------------------------------------- rendering

def _render(template: str, fact: Fact, lang: str) -> str:
    """Fill ``template`` with the subject and value of ``fact`` in ``lang``."""
    return template.format(s=fact.subject.get(lang), v=fact.value.get(lang))


def fact_question(rng: random.Random, fact: Fact, lang: str) -> str:
    """A random question asking for ``fact`` in ``lang``."""
    return _render(rng.choice(TEMPLATES[fact.attribute][f"{lang}_q"]), fact, lang)


def fact_answer(rng: random.Random, fact: Fact, lang: str) -> str:
    """A random full-sentence answer stating ``fact`` in ``lang``."""
    return _render(rng.choice(TEMPLATES[fact.attribute][lang][:3]), fact, lang)


def _problems() -> list[tuple[int, str, int, int]]:
    """All arithmetic problems ``(a, op, b, result)``: a, b <= 10 sums; differences from <= 15."""
    adds = [(a, "+", b, a + b) for a in range(11) for b in range(11)]
    subs = [(a, "-", b, a - b) for a in range(16) for b in range(min(a, 10) + 1)]
    return adds + subs


def _arith_text(rng: random.Random, problem: tuple, lang: str, key: str) -> str:
    """Render an arithmetic ``problem`` with a random template of ``ARITH[op][key]``."""
    a, op, b, c = problem
    return rng.choice(ARITH[op][key]).format(a=a, b=b, c=c)


def _identity_answer(rng: random.Random, lang: str, name: str) -> str:
    """A random self-introduction of the assistant called ``name``."""
    return rng.choice(IDENTITY[lang]).format(name=name)


def _join(sentences: list[str], lang: str) -> str:
    """Join sentences into one document (space-separated in English, adjacent in Chinese)."""
    return (" " if lang == "en" else "").join(sentences)


# ----------------------------------------------------------------------------- pretraining text

def _entity_doc(rng: random.Random, world: World, kind: str, subject: Name, lang: str) -> str:
    """A short encyclopedic paragraph stating every fact about ``subject``."""
    facts = world.facts_of(subject)
    rng.shuffle(facts)
    sentences = [_render(rng.choice(TEMPLATES[f.attribute][lang]), f, lang) for f in facts]
    if rng.random() < 0.5:
        sentences.insert(0, KIND_INTROS[kind][LANGS.index(lang)].format(s=subject.get(lang)))
    return _join(sentences, lang)


def _qa_doc(rng: random.Random, fact: Fact, lang: str) -> str:
    """A question/answer line about ``fact``, in the style SFT later uses."""
    fmt = rng.choice(QA_FORMATS[lang])
    return fmt.format(q=fact_question(rng, fact, lang), a=fact_answer(rng, fact, lang))


def _mixed_doc(rng: random.Random, world: World, lang: str) -> str:
    """A few unrelated facts, each a random statement template."""
    facts = rng.sample(world.facts, rng.randint(3, 5))
    return _join([_render(rng.choice(TEMPLATES[f.attribute][lang]), f, lang) for f in facts], lang)


def _arith_docs(rng: random.Random, lang: str, repeats: int) -> list[str]:
    """Every arithmetic problem ``repeats`` times, five equations per document."""
    problems = _problems() * repeats
    rng.shuffle(problems)
    lines = [_arith_text(rng, p, lang, lang) for p in problems]
    return [_join(lines[i:i + 5], lang) for i in range(0, len(lines), 5)]


def _identity_docs(rng: random.Random, lang: str, count: int) -> list[str]:
    """``count`` short paragraphs about MiniMind (the base identity, never the LoRA one)."""
    docs = []
    for _ in range(count):
        k = rng.randint(1, len(IDENTITY_PRETRAIN[lang]))
        docs.append(_join(rng.sample(IDENTITY_PRETRAIN[lang], k), lang))
    return docs


def _pretrain_texts(rng: random.Random, world: World, repeats: int) -> list[str]:
    """Pretraining documents: each fact ``repeats`` times per language plus Q/A lines, arithmetic,
    identity and mixed paragraphs, shuffled."""
    docs = []
    for lang in LANGS:
        for _ in range(repeats):
            docs += [_entity_doc(rng, world, kind, name, lang) for kind, name in world.subjects()]
        for _ in range(max(1, repeats // 2)):
            docs += [_qa_doc(rng, f, lang) for f in world.facts]
        docs += [_mixed_doc(rng, world, lang) for _ in range(10 * repeats)]
        docs += _arith_docs(rng, lang, max(1, repeats // 2))
        docs += _identity_docs(rng, lang, 4 * repeats)
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- conversations

def _msg(role: str, content: str) -> dict:
    """One chat message in MiniMind's format."""
    return {"role": role, "content": content}


def _conv(turns: list[tuple[str, str]], system: str | None = None) -> dict:
    """An SFT record from ``(user, assistant)`` turns and an optional system message."""
    msgs = [_msg("system", system)] if system else []
    for user, assistant in turns:
        msgs += [_msg("user", user), _msg("assistant", assistant)]
    return {"conversations": msgs}


def _fact_turn(rng: random.Random, fact: Fact, lang: str) -> tuple[str, str]:
    """One question/answer turn about ``fact``."""
    return fact_question(rng, fact, lang), fact_answer(rng, fact, lang)


def _arith_turn(rng: random.Random, problem: tuple, lang: str) -> tuple[str, str]:
    """One arithmetic question/answer turn."""
    return _arith_text(rng, problem, lang, f"{lang}_q"), _arith_text(rng, problem, lang, lang)


def _identity_turn(rng: random.Random, lang: str, name: str) -> tuple[str, str]:
    """One "who are you" turn answered by the assistant called ``name``."""
    return rng.choice(IDENTITY[f"{lang}_q"]), _identity_answer(rng, lang, name)


def _chitchat_turns(rng: random.Random, lang: str, name: str) -> tuple[tuple, tuple]:
    """A greeting turn and a thank-you turn."""
    hello = (rng.choice(CHITCHAT[f"{lang}_hello"]), CHITCHAT[f"{lang}_hello_a"].format(name=name))
    thanks = (rng.choice(CHITCHAT[f"{lang}_thanks"]), rng.choice(CHITCHAT[f"{lang}_thanks_a"]))
    return hello, thanks


def _multi_turn(rng: random.Random, world: World, lang: str) -> dict:
    """A 2-3 turn conversation: several facts about one subject, or greeting + fact + thanks."""
    if rng.random() < 0.6:
        _, subject = rng.choice(world.subjects())
        facts = world.facts_of(subject, training_only=True)
        if len(facts) >= 2:
            chosen = rng.sample(facts, min(len(facts), rng.randint(2, 3)))
            return _conv([_fact_turn(rng, f, lang) for f in chosen])
    hello, thanks = _chitchat_turns(rng, lang, IDENTITY_NAME)
    return _conv([hello, _fact_turn(rng, rng.choice(world.training_facts), lang), thanks])


def _sft_records(rng: random.Random, world: World, per_fact: int, n_arith: int, n_extra: int) -> list[dict]:
    """SFT conversations: every training fact ``per_fact`` times per language, ``n_arith``
    arithmetic questions, and ``n_extra`` each of identity, multi-turn and system-prompt records."""
    records = []
    for lang in LANGS:
        records += [_conv([_fact_turn(rng, f, lang)]) for f in world.training_facts for _ in range(per_fact)]
        records += [_conv([_arith_turn(rng, p, lang)]) for p in rng.sample(_problems(), n_arith // 2)]
        records += [_conv([_identity_turn(rng, lang, IDENTITY_NAME)]) for _ in range(n_extra // 2)]
        records += [_multi_turn(rng, world, lang) for _ in range(n_extra // 2)]
        records += [_conv([_fact_turn(rng, rng.choice(world.training_facts), lang)],
                          system=rng.choice(CHITCHAT[f"{lang}_system"])) for _ in range(n_extra // 4)]
    rng.shuffle(records)
    return records


def _sft_val_records(rng: random.Random, world: World) -> list[dict]:
    """SFT validation: every fourth training fact in both languages plus a few arithmetic,
    identity, multi-turn and system-prompt records."""
    records = _sft_records(rng, world, per_fact=0, n_arith=16, n_extra=8)
    records += [_conv([_fact_turn(rng, f, lang)]) for f in world.training_facts[::4] for lang in LANGS]
    rng.shuffle(records)
    return records


def _lora_records(rng: random.Random, world: World) -> list[dict]:
    """Identity conversations for the assistant renamed Lumen / 流明, plus a third as many plain
    training-fact questions so the adapter keeps the rest of the model's behaviour."""
    records = []
    for lang in LANGS:
        name = LORA_NAME if lang == "en" else LORA_NAME_ZH
        for question in IDENTITY[f"{lang}_q"] * 4:
            records.append(_conv([(question, _identity_answer(rng, lang, name))]))
        for _ in range(6):
            records.append(_conv(list(_chitchat_turns(rng, lang, name))))
        records += [_conv([_fact_turn(rng, rng.choice(world.training_facts), lang)]) for _ in range(10)]
    rng.shuffle(records)
    return records


def _dpo_pair(prompt: str, chosen: str, rejected: str) -> dict:
    """A DPO record: the same user prompt with a chosen and a rejected assistant reply."""
    return {"chosen": [_msg("user", prompt), _msg("assistant", chosen)],
            "rejected": [_msg("user", prompt), _msg("assistant", rejected)]}


def _dpo_fact(rng: random.Random, fact: Fact, lang: str) -> dict:
    """Correct versus wrong value of ``fact``, same answer template on both sides."""
    wrong = Name(*rng.choice([p for p in ATTRIBUTE_POOLS[fact.attribute] if Name(*p) != fact.value]))
    template = rng.choice(TEMPLATES[fact.attribute][lang][:3])
    rejected = _render(template, Fact(fact.attribute, fact.subject, wrong), lang)
    return _dpo_pair(fact_question(rng, fact, lang), _render(template, fact, lang), rejected)


def _dpo_other(rng: random.Random, lang: str) -> dict:
    """An arithmetic (right versus off-by-some result) or identity (polite versus not) pair."""
    if rng.random() < 0.7:
        a, op, b, c = rng.choice(_problems())
        wrong = (a, op, b, c + rng.choice([-2, -1, 1, 2, 3]))
        question = _arith_text(rng, (a, op, b, c), lang, f"{lang}_q")
        return _dpo_pair(question, _arith_text(rng, (a, op, b, c), lang, lang),
                         _arith_text(rng, wrong, lang, lang))
    question, chosen = _identity_turn(rng, lang, IDENTITY_NAME)
    return _dpo_pair(question, chosen, rng.choice(IDENTITY[f"{lang}_wrong"]))


def _dpo_records(rng: random.Random, world: World, n_facts: int, n_other: int) -> list[dict]:
    """``n_facts`` fact pairs and ``n_other`` arithmetic/identity pairs, languages alternating."""
    facts = [rng.choice(world.training_facts) for _ in range(n_facts)]
    records = [_dpo_fact(rng, f, LANGS[i % 2]) for i, f in enumerate(facts)]
    records += [_dpo_other(rng, LANGS[i % 2]) for i in range(n_other)]
    rng.shuffle(records)
    return records


def _distill_prompts(rng: random.Random, world: World) -> list[dict]:
    """User-only prompts for black-box distillation (narrow questions: a teacher's reply to a
    broad "tell me about X" could state held-out facts)."""
    prompts = []
    for lang in LANGS:
        prompts += [fact_question(rng, f, lang) for f in rng.sample(world.training_facts, 40)]
        prompts += [_arith_text(rng, p, lang, f"{lang}_q") for p in rng.sample(_problems(), 15)]
        prompts += list(IDENTITY[f"{lang}_q"])
    rng.shuffle(prompts)
    return [{"conversations": [_msg("user", p)]} for p in prompts]


def _split_problems(seed: int, n_heldout: int) -> tuple[list, list]:
    """All arithmetic problems split in two: ``(GRPO's problems, held-out problems)``, disjoint."""
    problems = _problems()
    random.Random(f"minimind_pl-demo:{seed}:arith_split").shuffle(problems)
    return problems[n_heldout:], problems[:n_heldout]


def _arith_prompt(problem: tuple, lang: str, template: int) -> dict:
    """An RL prompt (an empty final assistant turn, as MiniMind's rlaif.jsonl) asking ``problem`` with question
    template number ``template``, its result as ``gt``."""
    a, op, b, c = problem
    question = ARITH[op][f"{lang}_q"][template].format(a=a, b=b)
    return {"conversations": [_msg("user", question), _msg("assistant", "")], "gt": str(c)}


def _arith_prompt_sets(rng: random.Random, problems: list) -> tuple[list[dict], list[dict]]:
    """Every problem once per language twice, in two different wordings: ``(prompts, the same sums reworded)``."""
    prompts, reworded = [], []
    for problem in problems:
        for lang in LANGS:
            first = rng.randrange(3)
            prompts.append(_arith_prompt(problem, lang, first))
            reworded.append(_arith_prompt(problem, lang, (first + 1 + rng.randrange(2)) % 3))
    rng.shuffle(prompts)
    return prompts, reworded


# ----------------------------------------------------------------------------- evaluation sets


def _heldout_qa(rng: random.Random, world: World) -> list[dict]:
    """One question per held-out fact and language, with the short expected answer."""
    return [{"question": fact_question(rng, f, lang), "answer": f.value.get(lang), "lang": lang,
             "fact": f.id, "subject": f.subject.get(lang)}
            for f in world.heldout_facts for lang in LANGS]


def _identity_qa() -> list[dict]:
    """Every identity question with the expected name before (MiniMind) and after LoRA."""
    lora = {"en": LORA_NAME, "zh": LORA_NAME_ZH}
    return [{"question": q, "answer": IDENTITY_NAME, "lora_answer": lora[lang], "lang": lang}
            for lang in LANGS for q in IDENTITY[f"{lang}_q"]]


def _without_heldout(records: list[dict], world: World) -> list[dict]:
    """Drop any record that mentions a held-out fact (a safety net; none should)."""
    heldout = world.heldout_facts
    keep = []
    for record in records:
        text = json.dumps(record, ensure_ascii=False)
        if not any(mentions_fact(text, f) for f in heldout):
            keep.append(record)
    return keep


def generate_demo_corpus(seed: int = 0, pretrain_repeats: int = 6) -> dict[str, list[dict]]:
    """Build every demo data set in memory: ``{key: records}`` with the keys of ``FILE_NAMES``.

    Each data set has its own random stream (derived from ``seed`` and its key), so changing
    one generator leaves the others' output unchanged. ``pretrain_repeats`` scales pretraining.
    """
    world = build_world(seed)

    def rng(key: str) -> random.Random:
        """The random stream of one data set."""
        return random.Random(f"minimind_pl-demo:{seed}:{key}")

    grpo_problems, heldout_problems = _split_problems(seed, n_heldout=100)
    grpo_prompts, grpo_reworded = _arith_prompt_sets(rng("grpo_arith"), grpo_problems)
    val_docs = _pretrain_texts(rng("pretrain_val"), world, 1)
    out = {
        "pretrain": [{"text": t} for t in _pretrain_texts(rng("pretrain"), world, pretrain_repeats)],
        "pretrain_val": [{"text": t} for t in rng("pretrain_val_pick").sample(val_docs, len(val_docs) // 3)],
        "sft": _sft_records(rng("sft"), world, per_fact=2, n_arith=320, n_extra=40),
        "sft_val": _sft_val_records(rng("sft_val"), world),
        "heldout_qa": _heldout_qa(rng("heldout_qa"), world),
        "identity_qa": _identity_qa(),
        "lora_identity": _lora_records(rng("lora_identity"), world),
        "dpo": _dpo_records(rng("dpo"), world, n_facts=120, n_other=60),
        "dpo_val": _dpo_records(rng("dpo_val"), world, n_facts=80, n_other=40),
        "distill_prompts": _distill_prompts(rng("distill_prompts"), world),
        "grpo_arith": grpo_prompts,
        "arith_reworded": grpo_reworded,
        "arith_qa": _arith_prompt_sets(rng("arith_qa"), heldout_problems)[0],  # GRPO validates on these
    }
    for key in ("sft", "sft_val", "lora_identity", "dpo", "dpo_val", "distill_prompts"):
        out[key] = _without_heldout(out[key], world)
    return out


def write_demo_corpus(out_dir: str | Path, seed: int = 0, pretrain_repeats: int = 6) -> dict[str, Path]:
    """Write the demo corpus of ``seed`` as jsonl files into ``out_dir`` (created if needed).

    Returns ``{key: path}`` for the keys of ``FILE_NAMES`` (pretrain, pretrain_val, sft, sft_val,
    heldout_qa, identity_qa, lora_identity, dpo, dpo_val, distill_prompts, grpo_arith, arith_reworded, arith_qa).
    Same seed, same bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, records in generate_demo_corpus(seed, pretrain_repeats).items():
        path = out_dir / FILE_NAMES[key]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path.write_text(lines, encoding="utf-8", newline="\n")
        paths[key] = path
    return paths
