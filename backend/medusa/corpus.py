"""The self-distillation prompts Medusa heads (and the drafter's tuning) learn from, by category.

Heads learn what the served model writes after the prompts they saw; heads trained on one narrow kind
of prompt guess well only there. So the prompts cover what people send a chat/completion server:

| category | what | source |
|---|---|---|
| chat | a question, through the model's chat template | templates in this module x topics |
| instruction | a task (write, explain, give tips), through the template | templates x topics |
| code | code to continue (Python, C, Perl, JavaScript, shell), and "write a function that ..." | installed sources and docstrings |
| prose | the opening words of a paragraph to continue | Python's docs, docstrings, Debian READMEs |
| list | a list to continue or to write | templates x topics |
| json | a JSON document to continue or to write | installed package.json files, templates |
| multiturn | a second question after a first exchange, through the template | templates, doc sentences |
| rag | "answer from this passage" | doc paragraphs x question templates |
| rewrite | "rewrite this code" | installed sources x rewrite templates |

Sources ship with the repo (backend/medusa/data/) or with a package on the machine: Python's standard
library (docstrings, source, pydoc topics), Debian's package descriptions and /usr/share/doc, npm's
and Perl's installed modules. Whatever is missing on a machine is skipped. Deduplicated; the training
command holds out a share of every category, and the benchmark's prompts (bench/) are written apart.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
CATEGORIES = ("chat", "instruction", "code", "prose", "list", "json", "multiturn", "rag", "rewrite")

STDLIB_MODULES = (
    "abc argparse asyncio base64 bisect calendar collections configparser contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html http io "
    "ipaddress itertools json logging math mimetypes operator os pathlib pickle pprint queue random re "
    "sched secrets shlex shutil socket sqlite3 statistics string struct subprocess tarfile tempfile "
    "textwrap threading time timeit tokenize traceback types typing unittest urllib uuid warnings weakref "
    "xml zipfile zlib"
).split()

QUESTIONS = [
    "What is {t}?", "Can you explain {t} in simple terms?", "How does {t} work?", "Why is {t} important?",
    "What are the main uses of {t}?", "What should a beginner know about {t}?", "Tell me about {t}.",
    "What are the pros and cons of {t}?", "Give me a short overview of {t}.", "How would you describe {t} to a child?",
    "What is the history of {t}?", "What are common mistakes people make with {t}?",
]
INSTRUCTIONS = [
    "Write a short paragraph about {t}.", "Write a haiku about {t}.", "Give three tips for learning about {t}.",
    "Write a short email to a colleague explaining {t}.", "Summarize {t} in two sentences.",
    "Write a tweet announcing something new about {t}.", "Explain {t} as if you were a teacher.",
    "Write the opening lines of a story that involves {t}.", "Describe {t} in a formal tone.",
    "Write a product description for a tool related to {t}.",
]
LISTS_CHAT = [
    "List five facts about {t}.", "Give me a numbered list of steps to get started with {t}.",
    "List three advantages and three disadvantages of {t}.", "What are the key terms related to {t}? Give a list.",
]
LISTS_RAW = ["Here are five facts about {t}:\n\n1.", "Things to know about {t}:\n- ", "A checklist for {t}:\n\n1. "]
JSON_CHAT = [
    'Return a JSON object describing {t} with the keys "name", "summary" and "tags".',
    'Give a JSON array of three objects, each with "term" and "definition", about {t}.',
    "Write a JSON configuration file for a small application that deals with {t}.",
    'Describe {t} as JSON with the fields "title", "difficulty" (1-5) and "related".',
]
WRITE_CODE = [
    "Write a {lang} function that {task}.", "Show me {lang} code that {task}.",
    "How do I write a {lang} function that {task}?", "Implement this in {lang}: a function that {task}.",
]
FOLLOW_UPS = [
    "Can you give an example?", "Why is that?", "Can you explain that more simply?", "What else should I know?",
    "How is that used in practice?", "Can you summarize that in one sentence?", "Is there an alternative?",
]
RAG = [
    "Answer the question using only the passage below.\n\nPassage:\n{p}\n\nQuestion: What is the main point of the passage?",
    "Read this text and summarize it in one sentence.\n\n{p}",
    "Using the passage, explain what it says about {k}.\n\nPassage: {p}",
    "Here is a document:\n\n{p}\n\nQuote the sentence that mentions {k} and explain it.",
    "Context:\n{p}\n\nBased on the context above, what does it say about {k}?",
]
REWRITE = [
    "Rewrite this {lang} code with clearer names:\n\n```{lang}\n{c}\n```",
    "Add comments to this {lang} code:\n\n```{lang}\n{c}\n```",
    "Refactor the following {lang} code and explain the change:\n\n```{lang}\n{c}\n```",
    "Fix any bugs in this {lang} code:\n\n```{lang}\n{c}\n```",
    "Translate this {lang} code into Python:\n\n```{lang}\n{c}\n```",
]


@dataclass(frozen=True)
class Example:
    category: str
    prompt: str = ""  # a completion prompt, sent as it is
    messages: tuple[tuple[str, str], ...] = ()  # a chat, rendered through the model's chat template

    @property
    def key(self) -> str:
        return self.prompt or json.dumps(self.messages)


def _read(path: Path, limit: int = 200_000) -> str:
    try:
        raw = gzip.open(path).read(limit) if path.suffix == ".gz" else path.open("rb").read(limit)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return ""


# --- sources -------------------------------------------------------------------------------------
def python_docs() -> list[str]:
    """Texts of the pydoc topics and of the standard library's module, class and function docstrings."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        texts.append(inspect.getdoc(mod) or "")
        with warnings.catch_warnings():  # reading some deprecated names warns
            warnings.simplefilter("ignore")
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr, None)
                if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                    texts.append(inspect.getdoc(obj) or "")
    return texts


def debian_docs(root: Path = Path("/usr/share/doc")) -> list[str]:
    """README files of installed Debian packages."""
    if not root.is_dir():
        return []
    return [_read(p) for p in sorted(root.glob("*/README*"))[:400]]


def paragraphs(texts: list[str], min_words: int = 25, max_words: int = 180) -> list[str]:
    """Prose paragraphs: start with a letter, enough words, few code-like characters."""
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            words = para.split()
            if not (min_words <= len(words) <= max_words) or not para[:1].isalpha():
                continue
            if sum(c in "{}[]<>|=*#$\\" for c in para) > len(para) / 40:
                continue
            out.append(para)
    return list(dict.fromkeys(out))


def topics(rng: random.Random) -> list[str]:
    """Things to ask about: the repo's own list, Debian package descriptions, stdlib module summaries."""
    found = [line.strip() for line in (DATA / "topics.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    status = Path("/var/lib/dpkg/status")
    if status.exists():
        for line in status.read_text(errors="replace").splitlines():
            if line.startswith("Description: "):
                d = line[len("Description: "):].strip().rstrip(".")
                if 2 <= len(d.split()) <= 8 and d[:1].isalpha():
                    found.append(d[0].lower() + d[1:] if not d[:2].isupper() else d)
    for name in STDLIB_MODULES:
        found.append(f"Python's {name} module")
    found = list(dict.fromkeys(found))
    rng.shuffle(found)
    return found


def code_snippets(rng: random.Random) -> list[tuple[str, str]]:
    """(language, snippet): functions from the standard library's source, C headers, Perl modules,
    npm's JavaScript and shell scripts, each 4-30 lines."""
    import sysconfig

    out: list[tuple[str, str]] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_MODULES:
        path = stdlib / f"{name}.py"
        if not path.exists():
            path = stdlib / name / "__init__.py"
        out += [("python", s) for s in _blocks(_read(path), r"^(    )?def \w+\(", 4, 24)]
    for lang, pattern, files in (
        ("c", r"^(static |extern |int |void |char |struct \w+ \{|typedef )", sorted(Path("/usr/include").glob("*.h"))[:120]),
        ("perl", r"^sub \w+", sorted(Path("/usr/share/perl5").rglob("*.pm"))[:120]),
        ("javascript", r"^(async )?function \w+|^const \w+ = (async )?\(|^module\.exports", sorted(Path("/usr/lib/node_modules").rglob("*.js"))[:300]),
        ("bash", r"^\w+\(\) *\{", sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and _is_shell(p))[:80]
         if Path("/usr/bin").is_dir() else []),
    ):
        for path in files:
            out += [(lang, s) for s in _blocks(_read(path), pattern, 4, 24)]
    out = list(dict.fromkeys(out))
    rng.shuffle(out)
    return out


def _is_shell(path: Path) -> bool:
    try:
        return path.open("rb").read(32).startswith((b"#!/bin/sh", b"#!/bin/bash", b"#! /bin/sh"))
    except OSError:
        return False


def _blocks(text: str, start: str, min_lines: int, max_lines: int) -> list[str]:
    """Blocks of source beginning at lines matching `start`, up to the next blank line (or max_lines)."""
    lines = text.splitlines()
    pat = re.compile(start)
    out = []
    for i, line in enumerate(lines):
        if not pat.match(line):
            continue
        block = []
        for nxt in lines[i : i + max_lines]:
            if not nxt.strip() and len(block) >= min_lines:
                break
            block.append(nxt.rstrip())
        if len(block) >= min_lines and len("\n".join(block)) < 1500:
            out.append("\n".join(block))
    return out


def function_tasks() -> list[str]:
    """'returns the ...' tasks from the first line of standard-library function docstrings."""
    out = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = (inspect.getdoc(obj) or "").split("\n")[0].strip().rstrip(".") if inspect.isfunction(obj) else ""
            m = re.match(r"^(Return|Convert|Compute|Create|Find|Split|Parse|Check|Read|Write|Remove|Make)s? (.{10,90})$", doc)
            if m:
                verb = m.group(1).lower()
                out.append(f"{verb}s {m.group(2)}" if not verb.endswith("s") else f"{verb}es {m.group(2)}")
    return list(dict.fromkeys(out))


def package_json_heads(root: Path = Path("/usr/lib/node_modules")) -> list[str]:
    """The first lines of installed package.json files (JSON to continue)."""
    out = []
    for path in sorted(root.rglob("package.json"))[:200] if root.is_dir() else []:
        lines = _read(path, 4000).splitlines()
        if len(lines) > 6 and lines[0].strip() == "{":
            out.append("\n".join(lines[: 3 + len(out) % 4]))
    return list(dict.fromkeys(out))


def _openings(paras: list[str], rng: random.Random, per_paragraph: int = 2) -> list[str]:
    """The first words of a paragraph, and of a later sentence of it."""
    out = []
    for para in paras:
        words = para.split()
        starts = [0] + [i + 1 for i, w in enumerate(words[:-8]) if w.endswith(".") and words[i + 1][:1].isupper()]
        for i in starts[:per_paragraph]:
            out.append(" ".join(words[i : i + rng.randint(6, 16)]))
    return out


def _keyword(para: str, rng: random.Random) -> str:
    words = [w.strip(".,;:()\"'") for w in para.split()]
    long = [w for w in words if len(w) >= 6 and w.isalpha()]
    return rng.choice(long) if long else "its subject"


def _first_sentence(para: str) -> str:
    m = re.match(r"(.{20,300}?[.!?])(\s|$)", para)
    return m.group(1) if m else para[:200]


# --- the corpus ----------------------------------------------------------------------------------
def build(per_category: int, seed: int = 0) -> list[Example]:
    """Up to `per_category` examples of every category, deduplicated, in a seeded order."""
    rng = random.Random(seed)
    paras = paragraphs(python_docs() + debian_docs())
    rng.shuffle(paras)
    things = topics(rng)
    code = code_snippets(rng)
    tasks = function_tasks()
    rng.shuffle(tasks)
    langs = ["Python", "JavaScript", "C", "Go", "Rust", "Java", "Bash", "SQL"]

    def user(text: str) -> tuple[tuple[str, str], ...]:
        return (("user", text),)

    def pick(templates: list[str], **kw) -> str:
        return rng.choice(templates).format(**kw)

    cats: dict[str, list[Example]] = {c: [] for c in CATEGORIES}
    for i, t in enumerate(things):
        cats["chat"].append(Example("chat", messages=user(pick(QUESTIONS, t=t))))
        cats["instruction"].append(Example("instruction", messages=user(pick(INSTRUCTIONS, t=t))))
        if i % 2:
            cats["list"].append(Example("list", messages=user(pick(LISTS_CHAT, t=t))))
        else:
            cats["list"].append(Example("list", prompt=pick(LISTS_RAW, t=t)))
        cats["json"].append(Example("json", messages=user(pick(JSON_CHAT, t=t))))
    for i, (lang, snippet) in enumerate(code):
        lines = snippet.splitlines()
        cut = max(2, min(len(lines) - 1, rng.randint(2, 6)))
        cats["code"].append(Example("code", prompt="\n".join(lines[:cut]) + "\n"))
        if i < len(code) // 2 and len(snippet) < 900:
            templates = REWRITE if lang != "python" else [t for t in REWRITE if "into Python" not in t]
            cats["rewrite"].append(Example("rewrite", messages=user(pick(templates, lang=lang, c=snippet))))
    for i, task in enumerate(tasks):
        cats["code"].append(Example("code", messages=user(pick(WRITE_CODE, lang=langs[i % len(langs)], task=task))))
    cats["json"] += [Example("json", prompt=p) for p in package_json_heads()]
    cats["prose"] = [Example("prose", prompt=p) for p in _openings(paras, rng)]
    for i, para in enumerate(paras):
        if len(para.split()) <= 140:
            cats["rag"].append(Example("rag", messages=user(pick(RAG, p=para, k=_keyword(para, rng)))))
        # A first exchange about a passage (the answer: its first sentence), then a follow-up question.
        first = f"What is this text about?\n\n{para}" if len(para.split()) <= 100 else "Tell me about " + _keyword(para, rng) + "."
        cats["multiturn"].append(Example("multiturn", messages=(("user", first), ("assistant", _first_sentence(para)),
                                                                ("user", rng.choice(FOLLOW_UPS)))))
    out: list[Example] = []
    for c in CATEGORIES:
        unique = list({e.key: e for e in cats[c]}.values())
        rng.shuffle(unique)
        out += unique[:per_category]
    return out


def render(examples: list[Example], render_chat) -> list[tuple[str, str]]:
    """(category, prompt text): completion prompts as they are, chats through render_chat(messages)."""
    return [(e.category, e.prompt or render_chat([{"role": r, "content": c} for r, c in e.messages])) for e in examples]


def save(examples: list[Example], path: Path) -> None:
    """The corpus as gzipped JSON lines (the record of what heads were trained on)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"category": e.category, "prompt": e.prompt, "messages": e.messages}) + "\n")


def load(path: Path) -> list[Example]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [Example(d["category"], d["prompt"], tuple(tuple(m) for m in d["messages"])) for d in map(json.loads, f)]
