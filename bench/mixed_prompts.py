"""The mixed prompt set of bench.speculation, by category: written for the benchmark, never part of the
heads' training or held-out corpus (backend/medusa/corpus.py; tests/test_bench_prompts.py checks
that no prompt, passage or topic here appears there). Chats are rendered with the served model's
chat template by the benchmark; "rag" and "rewrite" are the reference-heavy categories (the answer
copies spans of the prompt)."""

from __future__ import annotations

CHAT = [
    "Why do cats purr?",
    "How long should I boil an egg for a soft yolk?",
    "What is the difference between weather and climate forecasts for farmers?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "How do submarines stay underwater?",
    "What makes sourdough different from other breads?",
]

INSTRUCTION = [
    "Write a short thank-you note to a neighbour who watered my plants.",
    "Give me four ideas for a rainy Sunday afternoon with kids.",
    "Explain to a new employee how to book a meeting room.",
    "Write a limerick about a forgetful robot.",
    "Describe a sunrise over the desert in three sentences.",
    "Draft a polite message asking a landlord to fix a leaking tap.",
]

CODE = [
    "def celsius_to_fahrenheit(celsius):\n    \"\"\"Convert a temperature in Celsius to Fahrenheit.\"\"\"\n",
    "// Returns the largest element of a non-empty integer array.\nint max_element(const int *values, size_t count) {\n",
    "function slugify(title) {\n  // lower-case, spaces to dashes, drop anything that is not a letter or digit\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack backed by a Python list.\"\"\"\n\n    def __init__(self):\n",
    "#!/bin/bash\n# Back up every .conf file in /etc/myapp into a dated tar archive.\n",
    "SELECT customer_id, COUNT(*) AS orders\nFROM orders\n",
]

PROSE = [
    "The old bookshop on the corner had not changed in forty years. Its windows",
    "When the first snow fell on the mountain village, the children",
    "Marta had always wanted to sail around the island, and on the morning of her thirtieth birthday she",
    "The museum's newest exhibit, a collection of antique clocks,",
    "After three days of walking through the marshes, the travellers finally saw",
    "Every spring the river floods the low fields, and the farmers",
]

PASSAGES = [
    ("The Harbourview ferry leaves Pier 3 every forty minutes between 6:10 and 22:30. Bicycles travel free, "
     "but scooters must be folded. Tickets bought on board cost 4.50 euros; tickets bought in the app cost "
     "3.80 euros. On public holidays the first ferry leaves at 8:00.",
     "When does the first ferry leave on a public holiday, and how much is a ticket bought in the app?"),
    ("Greenfield Library lends up to twelve items per card. Books may be kept for three weeks and renewed twice "
     "online; films are lent for one week and cannot be renewed. Late returns cost 20 cents per item per day, "
     "capped at 5 euros per item.",
     "How long can I keep a film, and what is the most I pay for one late book?"),
    ("The Model K7 kettle holds 1.7 litres. Fill it between the MIN and MAX marks, close the lid until it clicks, "
     "and press the switch down. The light turns off when the water boils. Descale it once a month with a "
     "mixture of half water and half white vinegar.",
     "How do I descale the kettle and how often?"),
    ("Orchard Street clinic opens at 7:30 on weekdays and at 9:00 on Saturdays; it is closed on Sundays. Blood "
     "tests need an appointment and a fasting period of eight hours. Vaccinations are given without an "
     "appointment until 11:00.",
     "Can I get a blood test on Saturday morning without booking?"),
    ("The Riverside 10K starts at 9:00 at the boat club. Runners collect their bibs at the town hall on the day "
     "before, between 14:00 and 19:00. The course has two water stations, at 3 km and 7 km, and closes after "
     "ninety minutes.",
     "Where and when do runners collect their bibs, and where are the water stations?"),
    ("To reset the Lumen router, hold the recessed button on the back for ten seconds until the front light blinks "
     "orange. The router restarts with the network name and password printed on the label underneath. Settings "
     "can then be changed at http://192.168.8.1 with the admin password from the same label.",
     "How do I reset the router and where do I find the password afterwards?"),
]

SNIPPETS = [
    ("python", "def f(l):\n    r = []\n    for x in l:\n        if x % 2 == 0:\n            r.append(x * x)\n    return r\n"),
    ("javascript", "function total(items) {\n  var t = 0;\n  for (var i = 0; i < items.length; i++) {\n"
                   "    t = t + items[i].price * items[i].qty;\n  }\n  return t;\n}\n"),
    ("python", "def read_config(path):\n    f = open(path)\n    data = {}\n    for line in f.readlines():\n"
               "        k, v = line.strip().split('=')\n        data[k] = v\n    return data\n"),
    ("c", "int count_spaces(char *s) {\n  int n = 0;\n  for (int i = 0; s[i] != 0; i++)\n"
          "    if (s[i] == ' ') n++;\n  return n;\n}\n"),
    ("python", "class Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self):\n        self.n = self.n + 1\n"
               "    def get(self):\n        return self.n\n"),
    ("javascript", "async function getUser(id) {\n  const res = await fetch('/api/users/' + id);\n"
                   "  const body = await res.json();\n  return body.user;\n}\n"),
]
REWRITES = [
    "Rewrite this {lang} code with descriptive names:",
    "Rewrite this {lang} code so it is easier to read:",
    "Add type hints or comments to this {lang} code and return the whole code:",
]


def prompts() -> list[dict]:
    """[{category, messages | prompt}]: six of each category."""
    out = [{"category": "chat", "messages": [{"role": "user", "content": q}]} for q in CHAT]
    out += [{"category": "instruction", "messages": [{"role": "user", "content": q}]} for q in INSTRUCTION]
    out += [{"category": "code", "prompt": c} for c in CODE]
    out += [{"category": "prose", "prompt": p} for p in PROSE]
    out += [{"category": "rag", "messages": [{"role": "user", "content": f"Answer using only this text.\n\n{p}\n\nQuestion: {q}"}]}
            for p, q in PASSAGES]
    out += [{"category": "rewrite", "messages": [{"role": "user", "content": REWRITES[i % len(REWRITES)].format(lang=lang)
                                                 + f"\n\n```{lang}\n{code}```"}]}
            for i, (lang, code) in enumerate(SNIPPETS)]
    return out


CATEGORIES = ("chat", "instruction", "code", "prose", "rag", "rewrite")
REFERENCE_HEAVY = ("rag", "rewrite")
