"""Held-out prompts for measurements and benchmarks: code, prose and mixed text, none used in tests.

`HELD_OUT_PROMPTS` is what benchmarks and `measure_pair` run; `HARD_PROMPTS` stress tokenizer
seams (CJK, emoji sequences, combining accents, CRLF, tabs, long digit runs).
"""

HELD_OUT_PROMPTS: tuple[str, ...] = (
    # code
    "def merge_sorted(left, right):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    result = []\n",
    "import json\nfrom pathlib import Path\n\n\ndef load_config(path: Path) -> dict:\n",
    "class LRUCache:\n    def __init__(self, capacity: int) -> None:\n        self.capacity = capacity\n",
    "async def fetch_all(session, urls):\n    tasks = [",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n",
    "SELECT customers.name, COUNT(orders.id) AS order_count\nFROM customers\nLEFT JOIN orders",
    "function debounce(fn, delay) {\n  let timer;\n  return function (...args) {\n",
    "#!/usr/bin/env bash\nset -euo pipefail\n\nfor file in *.log; do\n",
    "    @property\n    def area(self) -> float:\n        return math.pi *",
    # prose
    "The Industrial Revolution began in Britain in the late eighteenth century, when",
    "To bake a loaf of sourdough bread, you first need to",
    "Honeybees communicate the location of flowers to each other by",
    "The main difference between a virus and a bacterium is that",
    "It was a cold, grey morning when the lighthouse keeper noticed",
    "In economics, the law of supply and demand states that",
    "The Amazon rainforest covers much of the Amazon basin of South America and",
    # mixed
    "To install the package, run `pip install requests` and then import it with",
    "Q: What does the Python expression `[x * 2 for x in range(3)]` evaluate to?\nA:",
    "Step 1: Preheat the oven to 180 °C (350 °F).\nStep 2:",
    "The HTTP status code 404 means that the server",
)

HARD_PROMPTS: tuple[str, ...] = (
    "東京は日本の首都であり、",
    "北京是中国的首都，也是",
    "Our family photo: 👩\u200d👩\u200d👧\u200d👦 at the beach 🏖️, then",
    "Cafe\u0301 au lait, cre\u0300me bru\u0302le\u0301e and a pin\u0303a colada cost",
    "name,age,city\r\nAlice,30,Paris\r\nBob,25,",
    "id\tname\tscore\n1\tada\t97\n2\tgrace\t",
    "The first 30 digits of pi are 3.14159265358979323846264338327",
    "Order #000123456789 shipped on 2024-03-15T08:30:00Z; tracking",
)
