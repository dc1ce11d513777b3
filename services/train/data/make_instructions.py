"""Writes services/train/data/instructions.jsonl: the self-distillation
instruction set (template x topic, seeded), none from the benchmark."""
import json, random
rng = random.Random(2026)
topics = ["volcanoes", "the moon", "honey bees", "the printing press", "electric cars", "rainforests", "chess",
          "the human heart", "solar panels", "ancient Egypt", "the internet", "glaciers", "vaccines", "jazz music",
          "the Roman Empire", "recycling", "earthquakes", "photosynthesis in algae", "black holes", "the stock market",
          "coral reefs", "bicycles", "democracy", "coffee farming", "the water cycle", "sleep", "robots",
          "the Olympic Games", "penguins", "compost", "bridges", "trains", "the immune system", "wind turbines",
          "libraries", "mushrooms", "satellites", "deserts", "friendship", "time zones"]
chat = ["Tell me about {t}.", "Explain {t} in simple words.", "Give me three interesting facts about {t}.",
        "Why do people care about {t}?", "Write a short story that involves {t}.", "Write a haiku about {t}.",
        "What are the pros and cons of {t}?", "How would you explain {t} to a child?",
        "Give me a short history of {t}.", "What should a beginner know about {t}?",
        "Write a friendly email inviting a friend to a talk about {t}.", "List five questions a student might ask about {t}."]
advice = ["How can I get better at {s}?", "Give me a weekly plan to practice {s}.", "What are common mistakes when {s}?",
          "I feel nervous about {s}. Any advice?"]
skills = ["public speaking", "cooking dinner", "running", "learning French", "drawing", "writing essays",
          "saving money", "playing guitar", "gardening", "swimming", "job interviews", "time management"]
math = ["If a box holds {a} pencils and I buy {b} boxes, how many pencils do I have?",
        "What is {a} plus {b}? Show your work.", "What is {a} times {b}?",
        "A shop sells a book for {a} dollars with a {p} percent discount. What is the new price?",
        "A car drives at {a} km per hour for {b} hours. How far does it travel?",
        "I have {a} candies and share them equally among {c} friends. How many does each get, and how many are left?",
        "What is {p} percent of {a}?", "Subtract {b} from {a} and explain the steps.",
        "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        "Write the multiplication table of {c} from {c}x2 to {c}x12.",
        "If a recipe needs {c} eggs for {b} people, how many eggs for {a} people?",
        "A tank holds {a} liters and leaks {c} liters per hour. How long until it is empty?"]
code_snippets = [
    "def count_words(text):\n    words = text.split()\n    counts = {}\n    for w in words:\n        counts[w] = counts.get(w, 0) + 1\n    return counts",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True",
    "class Counter:\n    def __init__(self):\n        self.value = 0\n    def increment(self):\n        self.value += 1\n    def reset(self):\n        self.value = 0",
    "def fibonacci(n):\n    a, b = 0, 1\n    result = []\n    for _ in range(n):\n        result.append(a)\n        a, b = b, a + b\n    return result",
    "def reverse_string(s):\n    out = ''\n    for ch in s:\n        out = ch + out\n    return out",
    "SELECT name, age\nFROM users\nWHERE age > 30\nORDER BY name;",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1",
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(2, 3));",
]
texts = ["The old lighthouse stood on the cliff for two hundred years. Sailors trusted its light on stormy nights, and the keeper's family lived in the small house beside it.",
         "Bees visit flowers to collect nectar and pollen. As they move from flower to flower, they carry pollen that helps plants make seeds and fruit.",
         "The city library opened a new reading room last spring. It has large windows, quiet desks, and a corner with books for young children.",
         "Mount Everest is the highest mountain above sea level. Climbers usually need several weeks to adjust to the thin air before they try to reach the top.",
         "Clean water is essential for health. Many towns filter river water, add small amounts of chlorine, and test it every day before it reaches homes."]
copy = ["Repeat this code exactly and add a comment above each line:\n\n{code}", "Rewrite this code with clearer variable names and show the full result:\n\n{code}",
        "Explain what this code does, quoting each line first:\n\n{code}", "Add type hints to this code and show the whole thing:\n\n{code}",
        "Copy this text word for word, then give it a title:\n\n{text}", "Summarize this text in one sentence using its own words:\n\n{text}",
        "Rewrite this text for a young reader, keeping its facts:\n\n{text}", "List every noun in this text:\n\n{text}",
        "Write the numbers from {a} to {b}, one per line.", "List the months of the year with the number of days in each.",
        "Write the letters of the alphabet from {l1} to {l2}, separated by spaces.", "Count down from {b} to {a}, separated by commas."]
rows = []
for t in topics:
    for tpl in rng.sample(chat, 6):
        rows.append(("chat", tpl.format(t=t)))
for s in skills:
    for tpl in advice:
        rows.append(("chat", tpl.format(s=s)))
for i in range(120):
    tpl = math[i % len(math)]
    rows.append(("math", tpl.format(a=rng.randint(11, 480), b=rng.randint(2, 40), c=rng.randint(2, 12), p=rng.choice([5, 10, 15, 20, 25, 30, 40, 75]))))
letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
for i in range(96):
    tpl = copy[i % len(copy)]
    a = rng.randint(1, 40)
    l1 = rng.randint(0, 14)
    rows.append(("copy", tpl.format(code=code_snippets[i % len(code_snippets)], text=texts[i % len(texts)], a=a, b=a + rng.randint(10, 25),
                                    l1=letters[l1], l2=letters[l1 + rng.randint(5, 11)])))
seen, out = set(), []
for cat, text in rows:
    if text not in seen:
        seen.add(text)
        out.append({"id": f"sd-{len(out):03d}", "category": cat, "messages": [{"role": "user", "content": text}]})
bench = {json.loads(l)["messages"][-1]["content"] for l in open("/work/shared/bench/prompts.jsonl")}
assert not bench & seen
with open("/work/main/services/train/data/instructions.jsonl", "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
import collections; print(len(out), collections.Counter(r["category"] for r in out))
